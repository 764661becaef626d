//! `cargo run --example compile-config -- FILE...`: compiles each plugin configuration (JSON) with the filter's own
//! compiler, [`Config::from_json_with_env`], natively, and prints one line per file: `ok FILE` or
//! `error FILE: <the ConfigError Envoy would log>`. Exit 1 if any file is refused.
//!
//! Secrets are not read from this process: a variable or file a configuration names is looked up in the JSON
//! object of `$COMPILE_CONFIG_SECRETS` (`{"NAME": "value", "/path/to/file": "value"}`), and is missing otherwise,
//! so that a test decides what each secret holds (scripts/check-docs.py supplies placeholders).
use fhir_tenant_router::config::Config;
use fhir_tenant_router::secret_scope::FILE_BENEATH_PREFIX;
use fhir_tenant_router::upstream_auth::FILE_PREFIX;
use std::collections::BTreeMap;

fn main() {
    let secrets: BTreeMap<String, String> =
        std::env::var("COMPILE_CONFIG_SECRETS").ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    let lookup = |name: &str| -> Option<String> {
        let key = if let Some(rest) = name.strip_prefix(FILE_BENEATH_PREFIX) {
            rest.split_once('\0').map(|(_, path)| path)?
        } else {
            name.strip_prefix(FILE_PREFIX).unwrap_or(name)
        };
        secrets.get(key).cloned()
    };
    let mut refused = 0;
    for path in std::env::args().skip(1) {
        match std::fs::read(&path) {
            Err(e) => {
                refused += 1;
                println!("error {path}: cannot read: {e}");
            }
            Ok(bytes) => match Config::from_json_with_env(&bytes, &lookup) {
                Ok(_) => println!("ok {path}"),
                Err(e) => {
                    refused += 1;
                    println!("error {path}: {e}");
                }
            },
        }
    }
    std::process::exit(i32::from(refused > 0));
}
