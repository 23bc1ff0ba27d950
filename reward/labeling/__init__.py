"""Preference labelling: export samples for people to label (JSONL, Label Studio, Argilla), import their
labels as a preference dataset, and label automatically (rule, reward model, LLM judge) on the same path.

    alignment label export recipes/tiny/label_export.yaml   # -> items.jsonl, label_studio_*.json/xml, argilla_*.json
    alignment label auto   recipes/tiny/label_auto.yaml     # -> labelled.jsonl, agreement.json
    alignment label import recipes/tiny/label_import.yaml   # -> preferences.jsonl (read by `alignment rm`)
"""
