"""Helpers for the hostile-input corpora (test_attack_tokens.py, test_attack_paths.py): raw HTTP/1.1 and
HTTP/2 clients that send exactly the bytes a test names, token forgeries (by hand and with the published
`myjwt` tool), and an "attacker" web site that records whether anything ever fetched the keys it hosts."""
