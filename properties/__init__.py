"""Hypothesis properties of functional_llm (docs/transitions.md names what each one checks)."""
