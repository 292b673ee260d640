"""Constrained decoding on llguidance: grammars for tool-call sections and JSON output, per-sequence matchers that
mask the logits each step (:mod:`k2local.grammar.matcher`), and the llguidance view of k2local's tokenizers
(:mod:`k2local.grammar.vocab`). The library was picked by measurement: bench/constrain.py, bench/RESULTS.md."""
from k2local.grammar.grammars import GrammarError, ToolSpec, json_grammar, tool_calls_grammar
from k2local.grammar.matcher import Constraint, Grammar, apply_bitmask

__all__ = ["Constraint", "Grammar", "GrammarError", "ToolSpec", "apply_bitmask", "json_grammar", "tool_calls_grammar"]
