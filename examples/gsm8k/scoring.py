"""GSM8K scoring: prompt format, greedy generation with a stop criterion, answer extraction, EM.

The gold answer of a GSM8K item is the number after ``####`` on its last line. A generation is
scored by the number after its first ``####`` (the format the model is fine-tuned to produce);
a generation without ``####`` falls back to ``\\boxed{...}``, then to "the answer is N", then to the
last number in the text. Numbers are normalised before comparison: thousands separators, ``$``,
``%``, a leading ``+``, trailing ``.`` and trailing zeros after the decimal point are dropped
(``"$1,000.00"`` → ``"1000"``), and the comparison is exact on the normalised decimal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""Prompt for one question; the target is ``" " + solution`` followed by EOS."""

STOP_MARKERS = ("\nQuestion:", "\n\n\n")
"""Substrings after which a generation is cut (the model starts a new item)."""

_CALC = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"(?<![\w.])[-−]?\s?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_HASH_ANSWER = re.compile(r"####\s*([^\n]*)")
_FINAL_HASH = re.compile(r"####\s*[-−]?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)[^\S\n]*\n")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]*)", re.IGNORECASE)


def format_prompt(question: str) -> str:
    """The prompt for ``question`` (whitespace stripped).

    Raises:
        TypeError: if ``question`` is not a string.
        ValueError: if it is empty.

    Examples:
        >>> format_prompt(" How many? ")
        'Question: How many?\\nAnswer:'
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}.")
    if not question.strip():
        raise ValueError("question is empty; every GSM8K item needs a question.")
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_target(answer: str) -> str:
    """The training target for a GSM8K gold ``answer``: calculator annotations removed.

    Examples:
        >>> format_target("48/2 = <<48/2=24>>24\\n#### 24")
        ' 48/2 = 24\\n#### 24'
    """
    return " " + _CALC.sub("", answer).strip()


def normalize_number(text: str | None) -> str | None:
    """Canonical decimal string of the first number in ``text``, or ``None`` if there is none.

    Examples:
        >>> normalize_number("$1,234.50")
        '1234.5'
        >>> normalize_number("18.0.")
        '18'
        >>> normalize_number("-0")
        '0'
        >>> normalize_number("50%") , normalize_number("no number")
        ('50', None)
    """
    if text is None:
        return None
    match = _NUMBER.search(text.replace("−", "-"))
    if match is None:
        return None
    raw = re.sub(r"[\s$,]", "", match.group(0))
    try:
        value = Decimal(raw)
    except InvalidOperation:
        return None
    if value == 0:
        return "0"
    out = format(value.normalize(), "f")
    return out


def extract_gold(answer: str) -> str:
    """The normalised final number of a GSM8K gold answer (after ``####``).

    Raises:
        ValueError: if ``answer`` has no ``####`` line with a number.

    Examples:
        >>> extract_gold("Natalia sold 48+24 = <<48+24=72>>72 clips.\\n#### 72")
        '72'
        >>> extract_gold("#### 1,600")
        '1600'
    """
    match = _HASH_ANSWER.search(answer)
    number = normalize_number(match.group(1)) if match else None
    if number is None:
        raise ValueError(
            f"GSM8K gold answer has no '#### <number>' line: {answer[-80:]!r}. Is this the "
            "openai/grade-school-math format?"
        )
    return number


def extract_prediction(generation: str) -> str | None:
    """The normalised final number of a model generation, or ``None`` if it has none.

    Order: first ``#### N``; else ``\\boxed{N}``; else "the answer is N"; else the last number.

    Examples:
        >>> extract_prediction(" 5 + 3 = 8 apples\\n#### 8\\nQuestion: next")
        '8'
        >>> extract_prediction("She pays $1,200.00 in total.")
        '1200'
        >>> extract_prediction("no idea") is None
        True
    """
    text = cut_at_stop(generation)
    for pattern in (_HASH_ANSWER, _BOXED, _ANSWER_IS):
        match = pattern.search(text)
        if match:
            number = normalize_number(match.group(1))
            if number is not None:
                return number
    numbers = _NUMBER.findall(text.replace("−", "-"))
    return normalize_number(numbers[-1]) if numbers else None


def cut_at_stop(generation: str) -> str:
    """``generation`` up to the first stop marker (a new ``Question:``)."""
    cut = len(generation)
    for marker in STOP_MARKERS:
        idx = generation.find(marker)
        if idx != -1:
            cut = min(cut, idx)
    return generation[:cut]


def is_complete(generation: str) -> bool:
    """Whether a generation can stop: it has a full ``#### N`` line or a stop marker."""
    return bool(_FINAL_HASH.search(generation)) or any(m in generation for m in STOP_MARKERS)


def exact_match(prediction: str | None, gold: str) -> bool:
    """Whether the normalised prediction equals the normalised gold number."""
    if prediction is None:
        return False
    try:
        return Decimal(prediction) == Decimal(gold)
    except InvalidOperation:
        return False


def exact_match_rate(generations: Sequence[str], gold_answers: Sequence[str]) -> float:
    """Fraction of generations whose final number equals the gold number, in [0, 1].

    Raises:
        ValueError: if the two sequences differ in length or are empty.
    """
    if len(generations) != len(gold_answers):
        raise ValueError(
            f"got {len(generations)} generations for {len(gold_answers)} gold answers."
        )
    if not generations:
        raise ValueError("exact_match_rate needs at least one generation.")
    hits = sum(
        exact_match(extract_prediction(g), extract_gold(a))
        for g, a in zip(generations, gold_answers, strict=True)
    )
    return hits / len(generations)


class StopOnAnswer:
    """A ``transformers`` stopping criterion: a row is done once :func:`is_complete` holds.

    Only the last ``window`` generated tokens are decoded per call, so the cost stays linear in
    the generation length. Returns one flag per row (transformers ≥ 4.39).

    Args:
        tokenizer: The tokenizer used for generation.
        prompt_length: Number of (left-padded) prompt tokens before the generated ones.
        window: Tokens decoded per check.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, window: int = 24) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = int(prompt_length)
        self.window = int(window)
        self._done: Any = None

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.prompt_length :]
        if self._done is None or self._done.shape[0] != new.shape[0]:
            self._done = torch.zeros(new.shape[0], dtype=torch.bool, device=input_ids.device)
        tails = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        for i, tail in enumerate(tails):
            if not self._done[i] and is_complete(tail):
                self._done[i] = True
        return self._done.clone()


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Iterable[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """Greedy generations for ``questions`` (left padding, stop on ``#### N`` or a new question).

    Args:
        model: A causal LM with ``generate``.
        tokenizer: Its tokenizer (needs a pad token; padding side is set to left here).
        questions: GSM8K questions.
        max_new_tokens: Generation cap per question.
        batch_size: Questions per ``generate`` call.

    Returns:
        The generated continuations (prompt removed, cut at the first stop marker).
    """
    import torch
    from transformers import StoppingCriteriaList

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}."
        )
    prompts = [format_prompt(q) for q in questions]
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            length = enc["input_ids"].shape[1]
            stop = StoppingCriteriaList([StopOnAnswer(tokenizer, length)])
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    stopping_criteria=stop,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            texts = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
            outputs.extend(cut_at_stop(t) for t in texts)
    finally:
        model.train(was_training)
    return outputs
