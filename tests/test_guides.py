"""The guides cannot drift unnoticed: every command block is run by the walkthrough (``test_guides_e2e.py``)
or by the test or CI file named in its ``ELSEWHERE``; every configuration snippet validates; every file a
layout block names exists. Nothing here starts a process."""

from __future__ import annotations

import re

import pytest
import yaml
from test_guides_e2e import ELSEWHERE, SKIPPED_LINES, WALKTHROUGH

from hospital_fedlora.config import DataFiles, SiteConfig, validate

from guide_blocks import REPO, all_blocks, command_blocks, find


def test_every_command_block_is_run_by_the_walkthrough_or_named_elsewhere():
    claimed = [find(guide, piece) for guide, piece in [*WALKTHROUGH, *ELSEWHERE]]
    doubled = {str(b) for b in claimed if claimed.count(b) > 1}
    assert not doubled, f"blocks claimed twice: {doubled}"
    unclaimed = [str(b) for b in command_blocks() if b not in claimed]
    assert not unclaimed, (
        "guide blocks no test runs; add a step to tests/test_guides_e2e.py (WALKTHROUGH) or name the test "
        f"that runs them (ELSEWHERE): {unclaimed}"
    )


@pytest.mark.parametrize("key", sorted(ELSEWHERE), ids=lambda k: f"{k[0]}:{k[1][:30]}")
def test_a_block_run_elsewhere_is_what_that_file_runs(key):
    block = find(*key)
    runner, must_contain = ELSEWHERE[key]
    text = (REPO / runner).read_text()
    missing = [piece for piece in must_contain if piece not in text]
    assert not missing, f"{block}: {runner} no longer runs it (missing {missing})"
    # And the guide's block still says what that file runs: its command module, its options.
    module = re.search(r"-m (\S+)", block.text).group(1)
    options = set(re.findall(r"(?<!\S)--[a-z][a-z-]*", block.text))
    assert module in text and all(o in text for o in options), f"{block}: {runner} runs something else"


def test_every_skipped_line_is_in_a_walkthrough_block_and_has_a_reason():
    texts = [find(g, p).text for g, p in WALKTHROUGH]
    for line, reason in SKIPPED_LINES.items():
        assert reason and any(line in t for t in texts), line


def test_the_site_config_snippets_validate():
    """The whole site config validates; snippets of its data section validate as that section."""
    blocks = [b for b in all_blocks() if b.guide == "docs/hospital-it.md" and b.lang == "yaml"]
    assert len(blocks) >= 3
    for block in blocks:
        raw = yaml.safe_load(block.text)
        if set(raw) == {"data"}:
            validate(DataFiles, raw["data"], str(block), "docs/hospital-it.md")
        else:
            validate(SiteConfig, raw, str(block), "docs/hospital-it.md")


def test_the_project_snippets_are_shaped_like_the_project_file():
    project = yaml.safe_load((REPO / "provisioning" / "project.yml").read_text())
    keys = {frozenset(p) for p in project["participants"]}
    for block in (b for b in all_blocks() if b.guide == "docs/admin.md" and b.lang == "yaml"):
        for participant in yaml.safe_load(block.text):
            assert frozenset(participant) in keys, f"{block}: {participant} has keys no participant has"
            assert re.fullmatch(r"[A-Za-z0-9_]+", participant["org"]), f"{block}: FLARE refuses org {participant['org']}"


_PATH = re.compile(r"^\s*((?:custom|tests|jobs|docs|provisioning|site_configs)/[\w./-]*)", re.M)


@pytest.mark.parametrize("guide", ["README.md", "docs/architecture.md"])
def test_every_path_a_layout_block_names_exists(guide):
    layouts = [b for b in all_blocks() if b.guide == guide and b.lang == ""]
    named = [m.group(1).rstrip("/") for b in layouts for m in _PATH.finditer(b.text)]
    assert named, f"{guide}: no layout block found"
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, f"{guide} names files that do not exist: {missing}"
