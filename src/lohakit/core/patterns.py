"""The regular expressions of a :class:`~lohakit.core.config.LoHaConfig`: compiled as the target
rules use them and matched in bounded time.

PEFT's matching rules (``core/targets.py``) turn ``target_modules`` / ``exclude_modules`` strings,
rank/alpha pattern keys and ``layers_pattern`` into regexes. A key that compiles alone can fail
inside the rule's form (``"(?i)lin1"`` → "global flags not at the start"), and a pattern such as
``"(.|.)*Z"`` backtracks exponentially. :func:`check_patterns` refuses both, naming the field and
the key; the config checks itself with it when constructed, and the PEFT reader again with the
model's module names.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from typing import Any, Iterable, Iterator

__all__ = ["PATTERN_TIME_LIMIT_S", "check_patterns", "pattern_forms"]

#: Time one pattern may take to match the probe strings or the model's module names.
PATTERN_TIME_LIMIT_S = 1.0


class _PatternTimeout(Exception):
    """Raised by the SIGALRM handler of :func:`_time_limit`."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
    """Interrupt the body after ``seconds`` with :class:`_PatternTimeout`; yields whether it can.

    Python's ``re`` checks for signals while it backtracks, so an ``ITIMER_REAL`` alarm stops
    a runaway match. Only the main thread receives signals (POSIX): elsewhere this yields
    False and the caller falls back to a static check. A timer the program had set is
    restored afterwards (with the time it had left).
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield False
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _PatternTimeout()

    try:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
    except (ValueError, OSError):  # e.g. signals unavailable in this interpreter
        yield False
        return
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - started), 1e-3), old_interval)


def _regex_tree(pattern: str) -> Any:
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    return sre_parse.parse(pattern)


def _looks_catastrophic(pattern: str) -> bool:
    """A static over-approximation of patterns that can backtrack exponentially.

    True for an unbounded repeat whose body holds another unbounded repeat or an alternation
    (``(a+)+``, ``(.|.)*``), or for more than four unbounded repeats in one pattern. Used only
    where a match cannot be timed (outside the main thread).
    """
    try:
        from re import _constants as C  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as C  # type: ignore[no-redef]
    repeats = {C.MAX_REPEAT, C.MIN_REPEAT} | ({C.POSSESSIVE_REPEAT} if hasattr(C, "POSSESSIVE_REPEAT") else set())
    count = 0

    def children(op: Any, av: Any) -> list[Any]:
        if op in repeats:
            return [av[2]]
        if op == C.SUBPATTERN:
            return [av[-1]]
        if op == C.BRANCH:
            return list(av[1])
        if op in (C.ASSERT, C.ASSERT_NOT):
            return [av[1]]
        if op == getattr(C, "ATOMIC_GROUP", None):
            return [av]
        if op == C.GROUPREF_EXISTS:
            return [b for b in av[1:] if b is not None]
        return []

    def has_choice(items: Any) -> bool:
        for op, av in items:
            if op == C.BRANCH or (op in repeats and av[1] > 1):
                return True
            if any(has_choice(c) for c in children(op, av)):
                return True
        return False

    def walk(items: Any) -> bool:
        nonlocal count
        for op, av in items:
            if op in repeats and av[1] > 16:
                count += 1
                if has_choice(av[2]):
                    return True
            if any(walk(c) for c in children(op, av)):
                return True
        return False

    return walk(_regex_tree(pattern)) or count > 4


def _probe_strings(pattern: str) -> list[str]:
    """Strings on which a backtracking-prone pattern shows it: runs of its own characters."""
    chars = {"a", ".", "0", "_"}
    for ch in pattern:
        if ch.isalnum() or ch in "._-":
            chars.add(ch)
        if len(chars) >= 12:
            break
    probes = []
    ordered = sorted(chars)
    for ch in ordered:
        probes += [ch * 32 + "\x00", ch * 48]
    for a, b in zip(ordered, ordered[1:] + ordered[:1]):  # two-character periods: '((ab)*|a)*c' on 'abab...'
        probes += [(a + b) * 28 + "\x00"]
    probes += ["a." * 24 + "!", "model.layers.0.self_attn.q_proj." * 3 + "!"]
    return probes


def pattern_forms(config: Any) -> list[tuple[str, str, str]]:
    """(field label, regex exactly as the target rules compile it, match mode) for each pattern.

    The forms follow ``core/targets.py``: ``target_modules``/``exclude_modules`` strings are
    full-matched; a rank/alpha pattern key ``p`` is used as ``(.*\\.)?(p)$``; a layers
    pattern ``p`` as ``(?:^|.*?\\.)p\\.(\\d+)\\.``.
    """
    forms: list[tuple[str, str, str]] = []
    tm = config.target_modules
    if isinstance(tm, str) and tm != "all-linear":
        forms.append(("target_modules", tm, "full"))
    if isinstance(config.exclude_modules, str):
        forms.append(("exclude_modules", config.exclude_modules, "full"))
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name) or {}:
            forms.append((f"{field_name} key {key!r}", rf"(.*\.)?({key})$", "match"))
    lp = config.layers_pattern
    if lp:
        for p in [lp] if isinstance(lp, str) else list(lp):
            forms.append((f"layers_pattern {p!r}", rf"(?:^|.*?\.){p}\.(\d+)\.", "match"))
    return forms


def check_patterns(
    config: Any, where: str, names: Iterable[str] | None = None, error: type[Exception] = ValueError
) -> None:
    """Every regex of ``config`` compiles as the target rules use it and matches in bounded time.

    Each pattern is compiled in the exact form the matching code builds (so ``"(?i)lin1"`` as
    a pattern key, which compiles alone but not inside ``(.*\\.)?(...)$``, is refused here), then
    matched against probe strings and, when given, ``names`` (the model's module paths) with
    a :data:`PATTERN_TIME_LIMIT_S` limit per pattern. Outside the main thread, where a match
    cannot be interrupted, patterns that look exponential are refused statically instead.

    Args:
        config: The config.
        where: Where the config comes from (a file, or ``LoHaConfig``), for messages.
        names: Module paths the patterns will be matched against.
        error: The exception class raised (``ValueError`` or a subclass).

    Raises:
        error: A pattern that does not compile or takes too long, naming its field and key.
    """
    name_list = list(names) if names is not None else None
    for label, form, mode in pattern_forms(config):
        if not isinstance(form, str):
            raise error(f"{where}: {label} must be a string regular expression, got {type(form).__name__}")
        try:
            rx = re.compile(form)
        except (re.error, TypeError, RecursionError, OverflowError, ValueError) as e:
            raise error(f"{where}: {label} is not a valid regular expression in PEFT's matching rule ({e})") from None
        strings = name_list if name_list is not None else _probe_strings(form)
        match = rx.fullmatch if mode == "full" else rx.match
        try:
            _bounded_match(match, strings, label, form, where, name_list is not None, error)
        except _PatternTimeout:  # the timer fired just after the last match, before it was stopped
            pass


def _bounded_match(
    match: Any, strings: list[str], label: str, form: str, where: str, model_names: bool, error: type[Exception]
) -> None:
    """Match every string within the time limit (or, where a match cannot be interrupted, refuse
    patterns that look exponential)."""
    with _time_limit(PATTERN_TIME_LIMIT_S) as timed:
        if not timed:
            try:
                risky = _looks_catastrophic(form)
            except Exception:  # noqa: BLE001 - the parser is private API; never fail on it
                risky = False
            if risky:
                raise error(
                    f"{where}: {label} nests repetitions (e.g. '(a+)+' or '(.|.)*'), which can take exponential "
                    "time to match; simplify the pattern"
                )
            return
        try:
            for text in strings:
                match(text)
        except _PatternTimeout:
            raise error(
                f"{where}: {label} takes more than {PATTERN_TIME_LIMIT_S:g} s to match "
                + ("the model's module names" if model_names else "short module-like names")
                + " (catastrophic backtracking, e.g. '(.|.)*' or '(a+)+'); simplify the pattern"
            ) from None
        except RecursionError:
            raise error(f"{where}: {label} is too complex to match") from None
