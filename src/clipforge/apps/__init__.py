"""Applications on top of an encoder: product tagging, content moderation, CLIP score, ranking and
explanation heat maps. Each module is a library API; the command line wraps it in clipforge/cli/apps.py."""
