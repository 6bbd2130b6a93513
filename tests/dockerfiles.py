"""Reading Dockerfiles and .dockerignore files without Docker, for the image tests: the
instructions as BuildKit's parser splits them, ARG defaults substituted in FROM, and whether a
path of the build context is sent to the builder (moby's rules: a pattern that matches a path or
one of its parent folders decides, the last such pattern wins, `!` lets a path back in)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY ...
    text: str  # the arguments as written, continuation lines joined
    line: int

    def arguments(self) -> list[str]:
        """The JSON (exec) form as its list, else the words as a shell splits them."""
        if self.text.startswith("["):
            try:
                value = json.loads(self.text)
                if isinstance(value, list) and all(isinstance(item, str) for item in value):
                    return value
            except ValueError:
                pass
        return shlex.split(self.text, comments=False)

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        """`COPY --from=build --chmod=0444 a b` -> ({"from": "build", "chmod": "0444"}, ["a", "b"])."""
        flags, words = {}, []
        for word in self.arguments():
            if word.startswith("--") and not words:
                name, _, value = word[2:].partition("=")
                flags[name] = value
            else:
                words.append(word)
        return flags, words


@dataclass
class Stage:
    base: str  # the FROM image, ARG defaults substituted
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(path: Path) -> list[Instruction]:
    result: list[Instruction] = []
    pending, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives
        if pending and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        result.append(Instruction(keyword.upper(), rest.strip(), start))
    assert not pending, f"{path}: the last instruction ends with a continuation"
    return result


def stages(path: Path) -> list[Stage]:
    """The build stages, in order; the last one is the image."""
    arguments: dict[str, str] = {}
    found: list[Stage] = []
    for item in instructions(path):
        if item.keyword == "ARG" and not found:
            name, _, default = item.text.partition("=")
            arguments[name.strip()] = default.strip()
        elif item.keyword == "FROM":
            words = item.arguments()
            words = [word for word in words if not word.startswith("--platform")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda match: arguments.get(match.group(1), match.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append(Stage(base, name))
        else:
            assert found, f"{path}:{item.line}: {item.keyword} before FROM"
            found[-1].instructions.append(item)
    return found


def ignore_file(dockerfile: Path, context: Path = REPO_ROOT) -> Path | None:
    """The ignore file BuildKit uses: `<Dockerfile>.dockerignore` beside it, else the context's."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), context / ".dockerignore"):
        if candidate.exists():
            return candidate
    return None


def ignore_rules(path: Path | None) -> list[tuple[bool, re.Pattern]]:
    """(lets back in, compiled pattern) for each rule, in order."""
    rules = []
    for line in (path.read_text().splitlines() if path else []):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        rules.append((negated, _compile(pattern)))
    return rules


def _compile(pattern: str) -> re.Pattern:
    parts, index = [], 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts) + r"\Z")


def in_context(relative: str, rules) -> bool:
    """Whether the context path (relative, with /) reaches the builder."""
    relative = relative.strip("/")
    pieces = relative.split("/")
    prefixes = ["/".join(pieces[:count]) for count in range(1, len(pieces) + 1)]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.match(prefix) for prefix in prefixes):
            excluded = not negated
    return not excluded


def tracked_files(root: Path = REPO_ROOT) -> list[str]:
    """The files a clone of the repository has (what a CI build's context holds), plus the ones
    added but not committed yet."""
    done = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if (root / line).exists()]


def matching(source: str, files: list[str]) -> list[str]:
    """The context files a COPY source names: the file itself, a folder's files, or a glob's."""
    source = source.strip("/").removeprefix("./")
    if source in ("", "."):
        return list(files)
    return [name for name in files
            if name == source or name.startswith(source + "/") or fnmatch.fnmatchcase(name, source)]
