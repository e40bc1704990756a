"""The deviations tables: the "ours" column read from the full presets, the README's rows the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anchorformer.engine.recipe import load_preset
from anchorformer.report import DEVIATIONS, deviation_tables

ROOT = Path(__file__).resolve().parents[1]
# rows on code behaviour (which parameters the one optimizer rule exempts, BN across devices, where the
# backbone's weights come from): no recipe key states them
CODE_ROWS = {"excluded from weight decay", "head norm", "backbone pre-training"}


def test_every_row_states_its_recipe_keys():
    tables = deviation_tables()
    assert set(tables) == {"deit", "maskrcnn", "semantic_fpn", "upernet"}
    for name, entry in tables.items():
        for row in entry["rows"]:
            assert "{" not in row["ours"], f"{name}/{row['what']}: unresolved key"
            if row["what"] not in CODE_ROWS:
                assert row["keys"], f"{name}/{row['what']}: 'ours' names no recipe key of the {entry['preset']} preset"


def test_ours_is_the_presets_value():
    tables = deviation_tables()
    cls, _ = load_preset("cls", "full")
    seg, _ = load_preset("seg", "full")
    rows = {(n, r["what"]): r for n, e in tables.items() for r in e["rows"]}
    assert rows[("deit", "epochs")]["ours"] == str(cls["epochs"])
    assert rows[("upernet", "neck")]["ours"].startswith(f"neck {seg['neck']}:")
    assert rows[("upernet", "schedule")]["ours"].startswith(f"{seg['recipes']['upernet']['iters']} iterations")
    assert rows[("semantic_fpn", "schedule")]["ours"].startswith(f"{seg['recipes']['fpn']['iters']} iterations")


def test_unknown_key_or_preset_is_named(tmp_path):
    raw = yaml.safe_load(DEVIATIONS.read_text(encoding="utf-8"))
    raw["deit"]["rows"][0][2] = "{no_such_key}"
    bad = tmp_path / "deviations.yaml"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ValueError, match=r"deviations.yaml: entry 'deit': no key 'no_such_key' in the cls preset"):
        deviation_tables(bad)
    raw = yaml.safe_load(DEVIATIONS.read_text(encoding="utf-8"))
    raw["upernet"]["preset"] = "seg:nope"
    bad.write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ValueError, match=r"entry 'upernet': seg.yaml \[full\] has no recipes.nope"):
        deviation_tables(bad)


def test_readme_rows_are_the_tables_deviating_rows():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for entry in deviation_tables().values():
        assert f"**{entry['title']}**" in readme
        for r in entry["rows"]:
            line = f"| {r['what']} | {r['anchor']} | {r['ours']} | {r['why']} |"
            assert (line in readme) == (not r["same"]), line
