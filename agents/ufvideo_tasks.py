"""UFVideo's three task templates (UFVideo Appendix B, Box 1), verbatim, filled with the annotator's short and
long descriptions (Box 2). Objects are written `object_1`, `object_2`, ... as Box 2's descriptions name them.

- PixRQA: each object is shown as a `<region>` (its mask on one frame); the answer is the long description and
  one `[SEG]` per object (its masks on the other frames).
- PixHQA: objects named in words, a time point `<Temp-x>` or a period `{<Temp-x1><Temp-x2>}`; one `[SEG]` per
  object (its masks at that time).
- PixTRQA: objects shown as `<region>`s; the answer gives the period first, then the long description, then
  one `[SEG]` per object.

Temporal tokens: `<Temp-x>` with x = round(99 * t / L), t the time from the start of the video (or window) and
L its length: time normalised to 0-99. Box 1 writes a period in braces, `{<Temp-x1><Temp-x2>}`; `braces=False`
leaves them out for a tokenizer that reads the two tokens alone.
"""

from __future__ import annotations

from typing import Sequence

TEMPORAL_BINS = 100  # <Temp-0> ... <Temp-99>


def temp_index(t: float, length: float) -> int:
    """The x of `<Temp-x>` for time `t` (seconds from the start) of a video of `length` seconds."""
    if length <= 0:
        return 0
    return int(min(TEMPORAL_BINS - 1, max(0, round((TEMPORAL_BINS - 1) * t / length))))


def temp_token(x: int) -> str:
    return f"<Temp-{x}>"


def period(x1: int, x2: int, *, braces: bool = True) -> str:
    tokens = temp_token(x1) + temp_token(x2)
    return "{" + tokens + "}" if braces else tokens


def _objects(shorts: Sequence[str], *, region: bool) -> str:
    mark = " <region>" if region else ""
    return ", ".join(f"object_{n}{mark} {_lower_first(s)}" for n, s in enumerate(shorts, 1))


def _masks(n: int) -> str:
    return "The segmentation mask: " + ", ".join(f"object_{i}[SEG]" for i in range(1, n + 1)) + "."


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _lower_first(text: str) -> str:
    """Box 1 puts each short description mid-sentence, after its object ("If object_1 <region> short
    description, ...", "What object_1 short description, ... are doing"), while Box 2's answers capitalise it
    ("object_1: Blue monster truck ..."), so its first letter is lowered: "If object_1 <region> blue monster
    truck ..." (the paper's own samples read "What is object 1: silver SUV ..."). An acronym ("SUV ...") stays."""
    return text[:1].lower() + text[1:] if text[:2].istitle() else text


def pixrqa(shorts: Sequence[str], long: str) -> tuple[str, str]:
    question = (f"If {_objects(shorts, region=True)}, what is a likely future event? "
                "And please generate the mask in every frames.")
    return question, f"{_sentence(long)} {_masks(len(shorts))}"


def pixhqa(shorts: Sequence[str], long: str, when: str) -> tuple[str, str]:
    """`when`: a `<Temp-x>` token (a time point) or a `period(...)`."""
    question = f"What {_objects(shorts, region=False)} are doing in the {when}, and generate the masks?"
    return question, f"{_sentence(long)} {_masks(len(shorts))}"


def pixtrqa(shorts: Sequence[str], long: str, when: str) -> tuple[str, str]:
    question = (f"What {_objects(shorts, region=True)} are doing? "
                "And please generate the time period and object mask.")
    return question, f"The Time is {when}. {_sentence(long)} {_masks(len(shorts))}"
