"""The JSON Schema in docs/ describes the policies the loader accepts: every example
validates, and shapes the loader rejects are rejected by the schema too."""
import glob
import json
import os
import unittest

import jsonschema
import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


class PolicySchemaTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(ROOT, "docs", "policy.schema.json")) as f:
            cls.schema = json.load(f)
        jsonschema.Draft202012Validator.check_schema(cls.schema)
        cls.validator = jsonschema.Draft202012Validator(cls.schema)

    def test_every_example_policy_validates(self):
        files = [f for f in glob.glob(os.path.join(ROOT, "examples", "*", "*.yaml"))
                 if not f.endswith(".test.yaml") and os.path.basename(f) != "tollgate.yaml"]
        self.assertGreaterEqual(len(files), 2)
        for f in files:
            with open(f) as fh:
                for doc in yaml.safe_load_all(fh):
                    errors = list(self.validator.iter_errors(doc))
                    self.assertEqual(errors, [], f"{f}: {[e.message for e in errors]}")

    def test_shapes_the_loader_rejects_are_rejected(self):
        base = {"apiVersion": "tollgate/v1", "kind": "Policy"}
        bad = [
            {**base, "toolz": []},
            {**base, "rules": [{"id": "a", "effect": "sometimes"}]},
            {**base, "rules": [{"id": "a"}]},
            {**base, "tools": [{"name": "t", "match": {"methods": ["GET"]}}]},
            {**base, "rules": [{"id": "a", "effect": "allow", "when": {"params.x": {"between": 1}}}]},
            {**base, "rules": [{"id": "a", "effect": "allow", "rate_limit": {"requests": 1, "per": "1 minute"}}]},
            {**base, "pools": [{"name": "p", "effort": {"limit": 10}}]},
            {"apiVersion": "tollgate/v2", "kind": "Policy"},
            {**base, "limits": {"max_body_bytes": 0}},
            {**base, "limits": {"max_body_bytes": "0k"}},
            {**base, "rules": [{"id": "a", "effect": "halt", "when": {}}]},
            {**base, "rules": [{"id": "a", "effect": "halt", "when": {"params.x": {}}}]},
            {**base, "rules": [{"id": "a", "effect": "halt", "when": {"params.x": {"in": []}}}]},
            {**base, "rules": [{"id": "a", "effect": "halt", "when": {"time": {"between": ["09:00", "17:00"], "days": []}}}]},
            {**base, "rules": [{"id": "a", "effect": "halt", "match": {"methods": []}}]},
            {**base, "tools": [{"name": "t", "match": {"host": "a.example", "paths": []}}]},
            {**base, "rules": [{"id": "a", "effect": "halt", "rate_limit": {"requests": 1, "per": "1m"}}]},
            {**base, "rules": [{"id": "a", "effect": "allow", "cascade": {"quarantine": "5m"}}]},
        ]
        for doc in bad:
            self.assertTrue(list(self.validator.iter_errors(doc)), doc)


if __name__ == "__main__":
    unittest.main()
