"""What the API means: validated values (model), the one choke point that turns raw
objects into them (objects), manifest directories (manifests) and the reference
evaluator of the rules (reference)."""
