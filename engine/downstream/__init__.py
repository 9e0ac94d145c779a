"""Downstream adaptation: task heads, linear probe and fine-tune for the four clinical tasks."""
