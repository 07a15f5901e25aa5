"""ComfyUI's prompt emphasis, parsed as ComfyUI parses it.

Every expectation is written by hand from ComfyUI's rules: a bracket pair multiplies by 1.1, ``:w``
sets the weight (brackets inside multiply from there), ``\\(`` is a literal bracket, ``[ ]`` is plain
text, brackets that do not pair count as text, ``embedding:`` words are dropped and named.
"""

from __future__ import annotations

import pytest

from lora_nodes.nodes.core.emphasis import parse_prompt

CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("", []),
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("(red)", [("red", 1.1)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("(((red)))", [("red", 1.1 ** 3)]),
    # an explicit weight replaces what the brackets around it gave ...
    ("((red:1.5))", [("red", 1.5)]),
    # ... and brackets inside it multiply from there
    ("((red):1.5)", [("red", 1.5 * 1.1)]),
    ("(a (b:0.5) c:2)", [("a ", 2.0), ("b", 0.5), (" c", 2.0)]),
    # the number is what follows the last colon; the colons before it are text
    ("(a:b:0.7)", [("a:b", 0.7)]),
    # not a number after the colon, or the colon first: the colon is text, the weight 1.1
    ("(a:b)", [("a:b", 1.1)]),
    ("(:2)", [(":2", 1.1)]),
    ("(a:)", [("a:", 1.1)]),
    # a colon inside an inner group is not the outer group's
    ("(a (b:1.2))", [("a ", 1.1), ("b", 1.2)]),
    ("(a:1e-1)", [("a", 0.1)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    # square brackets are plain text in ComfyUI (not A1111's division by 1.1)
    ("[blue]", [("[blue]", 1.0)]),
    ("([blue])", [("[blue]", 1.1)]),
    # escaped brackets are literal, the backslash goes; other backslashes stay
    (r"\(a\)", [("(a)", 1.0)]),
    (r"(a \(b\):1.2)", [(r"a (b)", 1.2)]),
    (r"a\b", [(r"a\b", 1.0)]),
    # brackets that do not pair are text
    ("(a", [("(a", 1.0)]),
    ("a)", [("a)", 1.0)]),
    ("a) (b)", [("a) (b)", 1.0)]),
    ("((a)", [("(a", 1.1)]),
    ("()", []),
    ("x (y) z", [("x ", 1.0), ("y", 1.1), (" z", 1.0)]),
    ("a, (b:0.8), (c)", [("a, ", 1.0), ("b", 0.8), (", ", 1.0), ("c", 1.1)]),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_weights_as_comfyui_gives_them(text, expected):
    parsed = parse_prompt(text)
    assert [piece for piece, _ in parsed.pieces] == [piece for piece, _ in expected]
    assert [weight for _, weight in parsed.pieces] == pytest.approx([weight for _, weight in expected])
    assert parsed.embeddings == ()


def test_embedding_words_are_dropped_and_named():
    # the name is the word after "embedding:"; the words after it stay
    parsed = parse_prompt("a photo embedding:easynegative of a cat")
    assert parsed.pieces == (("a photo", 1.0), ("of a cat", 1.0))
    assert parsed.embeddings == ("easynegative",)
    # a comma after the name is not part of it, and stays in the text
    parsed = parse_prompt("embedding:style, red")
    assert parsed.pieces == ((", red", 1.0),)
    assert parsed.embeddings == ("style",)
    # inside a group the embedding takes the group's weight (and is still dropped)
    parsed = parse_prompt("(embedding:foo bar:1.4)")
    assert parsed.pieces == (("bar", 1.4),)
    assert parsed.embeddings == ("foo",)
    # "embedding:" inside a word is no embedding
    assert parse_prompt("myembedding:x").pieces == (("myembedding:x", 1.0),)
