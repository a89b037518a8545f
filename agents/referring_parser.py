"""Referring Parser (Strefer §2.1.2): an LLM turns the Entity Recognizer's paragraph into three aligned lists.

(1) referring expressions that tell the entities apart ("girl in a white dress"), (2) their nouns ("girl"),
(3) generalized categories ("girl" -> "person", "parrot" -> "bird"). The generalized category is what prompts
the detector in the Referring Masklet Generator (Grounding DINO is more reliable on simple nouns), so
`to_entity_refs` puts it in `EntityRef.noun`; the full expression goes to the grounder.

The answer is JSON validated against a schema whose validators carry the semantic rules (equal lengths, no
empty strings, distinct expressions, at most `max_entities`), so a broken rule is asked again with its error
like a syntax error; after `retries` it becomes a `Failure` keeping every raw answer. All paragraphs of a call
go to the model in one batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.analyzer import normalize_noun
from agents.common import Failure
from engine.chat import ask_json
from engine.models.interfaces import ChatMessage, ChatModel, ChatRequest
from engine.stats import Stats
from prompts import render
from schemas import EntityRef

AGENT = "parser"
TEMPLATE = "referring_parser"
MAX_LISTED_ENTITIES = 32  # hard bound of the JSON answer; `ParserConfig.max_entities` is tighter
MAX_EXPRESSION_CHARS = 120
MAX_EXPRESSION_WORDS = 16
MAX_NOUN_CHARS = 60
MAX_NOUN_WORDS = 4
MAX_CATEGORY_WORDS = 3

_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedEntity:
    expression: str  # "girl in a white dress": tells the entity apart; asks the grounder and the transcriber
    noun: str  # "girl"
    category: str  # "person": prompts the detector


def to_entity_refs(parsed: Sequence[ParsedEntity]) -> list[EntityRef]:
    """The masklet generator's input: each expression with its generalized category as the detector noun."""
    return [EntityRef(expression=p.expression, noun=p.category) for p in parsed]


@dataclass(frozen=True)
class ParserConfig:
    max_entities: int = 8  # per paragraph; more is an invalid answer, asked again
    max_paragraph_chars: int = 4000  # longer paragraphs are cut (counted) before they reach the prompt
    retries: int = 2  # re-asks of an invalid answer, each shown its error
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.max_entities <= MAX_LISTED_ENTITIES:
            raise ValueError(f"max_entities must be in [1, {MAX_LISTED_ENTITIES}], got {self.max_entities}")
        if self.max_paragraph_chars < 16:
            raise ValueError(f"max_paragraph_chars must be >= 16, got {self.max_paragraph_chars}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")


def normalize_expression(text: str) -> str:
    """Single spaces, no surrounding punctuation or quotes, no leading article; case kept (names, brands):
    "  The girl in a  White dress." -> "girl in a White dress"."""
    text = " ".join(text.split()).strip(" .,;:!?\"'")
    while _LEADING_ARTICLE.match(text):
        text = _LEADING_ARTICLE.sub("", text, count=1)
    return text


Expression = Annotated[str, Field(max_length=MAX_EXPRESSION_CHARS)]
NounText = Annotated[str, Field(max_length=MAX_NOUN_CHARS)]


def _clean_items(values: list[str], what: str, clean: Callable[[str], str], max_words: int) -> list[str]:
    out = []
    for i, value in enumerate(values):
        value = clean(value)
        if not value:
            raise ValueError(f"{what} {i} is empty: every entity needs a non-empty {what}")
        if len(value.split()) > max_words:
            raise ValueError(f"{what} {value!r} is too long: use at most {max_words} words")
        out.append(value)
    return out


class ParserAnswer(BaseModel):
    """`{"expressions": [...], "nouns": [...], "categories": [...]}`, three aligned lists; may be empty."""

    model_config = ConfigDict(extra="forbid")

    expressions: list[Expression] = Field(max_length=MAX_LISTED_ENTITIES)
    nouns: list[NounText] = Field(max_length=MAX_LISTED_ENTITIES)
    categories: list[NounText] = Field(max_length=MAX_LISTED_ENTITIES)

    @field_validator("expressions")
    @classmethod
    def _expressions(cls, values: list[str]) -> list[str]:
        return _clean_items(values, "expression", normalize_expression, MAX_EXPRESSION_WORDS)

    @field_validator("nouns")
    @classmethod
    def _nouns(cls, values: list[str]) -> list[str]:
        return _clean_items(values, "noun", normalize_noun, MAX_NOUN_WORDS)

    @field_validator("categories")
    @classmethod
    def _categories(cls, values: list[str]) -> list[str]:
        return _clean_items(values, "category", normalize_noun, MAX_CATEGORY_WORDS)

    @model_validator(mode="after")
    def _aligned_and_distinct(self) -> "ParserAnswer":
        lengths = (len(self.expressions), len(self.nouns), len(self.categories))
        if len(set(lengths)) != 1:
            raise ValueError(
                f"the lists must have the same length, one item per entity in each; got {lengths[0]} expressions, "
                f"{lengths[1]} nouns and {lengths[2]} categories"
            )
        seen: set[str] = set()
        for expression in self.expressions:
            key = expression.lower()
            if key in seen:
                raise ValueError(
                    f"expressions must be distinct: {expression!r} is listed twice; list each entity once, or tell "
                    "entities of one kind apart by appearance or position"
                )
            seen.add(key)
        return self


@lru_cache(maxsize=8)
def parser_schema(max_entities: int) -> type[ParserAnswer]:
    """`ParserAnswer` with at most `max_entities` items per list (in the JSON Schema sent to the backend too)."""

    class BoundedParserAnswer(ParserAnswer):
        model_config = ConfigDict(extra="forbid", title="ParserAnswer")

        expressions: list[Expression] = Field(max_length=max_entities)
        nouns: list[NounText] = Field(max_length=max_entities)
        categories: list[NounText] = Field(max_length=max_entities)

    return BoundedParserAnswer


class ReferringParser:
    """`ReferringParser(llm).parse(paragraphs)` -> per paragraph, its `ParsedEntity` list or a `Failure`.

    Failures: `empty_paragraph` (not sent), `invalid_answer` (no valid JSON after the retries; `detail` says the
    last broken rule), `no_entities` (a valid answer with empty lists).
    """

    prompts = (TEMPLATE,)  # template names, for provenance (prompts.template_hash)

    def __init__(self, llm: ChatModel, config: ParserConfig | None = None, stats: Stats | None = None) -> None:
        self.llm = llm
        self.config = config or ParserConfig()
        self.stats = stats if stats is not None else Stats()

    def parse(self, paragraphs: Sequence[str]) -> list[list[ParsedEntity] | Failure]:
        cfg, stats = self.config, self.stats
        results: list[list[ParsedEntity] | Failure | None] = [None] * len(paragraphs)
        asked: list[int] = []
        requests: list[ChatRequest] = []
        for i, paragraph in enumerate(paragraphs):
            stats.count(f"{AGENT}_paragraphs")
            text = str(paragraph).strip()
            if not text:
                results[i] = Failure("empty_paragraph", "the paragraph to parse is blank")
                stats.count(f"{AGENT}_failed_empty_paragraph")
                continue
            if len(text) > cfg.max_paragraph_chars:
                text = text[: cfg.max_paragraph_chars]
                stats.count(f"{AGENT}_paragraphs_truncated")
            prompt = render(TEMPLATE, paragraph=text, max_entities=cfg.max_entities)
            asked.append(i)
            requests.append(ChatRequest(messages=(ChatMessage.user(prompt),), max_tokens=cfg.max_tokens))

        schema = parser_schema(cfg.max_entities)
        with stats.timer(AGENT):
            answers = ask_json(self.llm, requests, schema, retries=cfg.retries, stats=stats, agent=AGENT)
        for i, answer in zip(asked, answers):
            raw = tuple(answer.raw)
            if not answer.ok:
                results[i] = Failure("invalid_answer", answer.error or "", raw)
                stats.count(f"{AGENT}_failed_invalid")
                continue
            value = answer.value
            if not value.expressions:
                results[i] = Failure("no_entities", "the model found no entity in the paragraph", raw)
                stats.count(f"{AGENT}_failed_no_entities")
                continue
            results[i] = [ParsedEntity(*t) for t in zip(value.expressions, value.nouns, value.categories)]
            stats.count(f"{AGENT}_entities", len(value.expressions))
            stats.count(f"{AGENT}_parsed")
        return results  # type: ignore[return-value]
