"""Edit datasets: each format read the EasyEdit way, the vendored ZsRE sample, and one-line errors naming file and record."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from mergeedit.core.errors import MergeEditError
from mergeedit.editing.datasets import load_edits
from mergeedit.editing.records import EditRecord, Probe

ZSRE = Path(__file__).resolve().parent.parent / "data" / "zsre" / "zsre_mend_eval_first1000.json"


def write_json(folder: Path, records, name: str = "edits.json", jsonl: bool = False) -> Path:
    path = folder / name
    text = "\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*args, **kwargs) -> str:
    with pytest.raises(MergeEditError) as info:
        load_edits(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ vendored ZsRE sample


def test_vendored_zsre_matches_readme_checksum():
    readme = (ZSRE.parent / "README.md").read_text()
    sha = re.search(r"sha256: `([0-9a-f]{64})`", readme).group(1)
    size = int(re.search(r"Size: ([\d,]+) bytes", readme).group(1).replace(",", ""))
    data = ZSRE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha
    assert len(data) == size


def test_zsre_sample_loads_998_usable_edits():
    edits = load_edits(ZSRE, "zsre")
    assert len(edits) == 998
    assert edits.skipped == (54, 103)
    assert [e.case_id for e in edits[53:56]] == ["53", "55", "56"]  # case ids stay the file's indices
    assert all(isinstance(e, EditRecord) and e.target.strip() for e in edits)


def test_zsre_record_0_exactly():
    assert load_edits(ZSRE, "zsre", limit=1) == [
        EditRecord(
            case_id="0",
            prompt="What university did Watts Humphrey attend?",
            target="University of Michigan",
            subject="Watts Humphrey",
            ground_truth="Illinois Institute of Technology",
            rephrases=("What university did Watts Humphrey take part in?",),
            locality=(Probe("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving", "nq"),),
        )
    ]


def test_zsre_rephrase_and_locality_mapping():
    raw = json.loads(ZSRE.read_text(encoding="utf-8"))
    for edit in load_edits(ZSRE, "zsre"):
        record = raw[int(edit.case_id)]
        assert (edit.prompt, edit.target, edit.subject) == (record["src"], record["alt"], record["subject"])
        assert edit.ground_truth == record["answers"][0]
        assert edit.rephrases == (record["rephrase"],)
        assert edit.locality == (Probe(record["loc"], record["loc_ans"], "nq"),)
        assert edit.locality[0].prompt.startswith("nq question: ")
        assert edit.portability == ()
    assert load_edits(ZSRE, "zsre", select=[999])[0].subject == "Eteocles"


def test_zsre_empty_targets_raise_when_not_skipped():
    message = load_error(ZSRE, "zsre", skip_empty_targets=False)
    assert str(ZSRE) in message and "record 54" in message and "'alt'" in message and "skip_empty_targets" in message


def test_zsre_selection_indexes_file_records():
    assert len(load_edits(ZSRE, "zsre", limit=104)) == 102  # records 54 and 103 fall inside and are skipped
    assert [e.case_id for e in load_edits(ZSRE, "zsre", start=998)] == ["998", "999"]
    assert [e.case_id for e in load_edits(ZSRE, "zsre", start=10, limit=3)] == ["10", "11", "12"]
    assert [e.case_id for e in load_edits(ZSRE, "zsre", select=[7, 2, 500])] == ["7", "2", "500"]
    assert [e.case_id for e in load_edits(ZSRE, "zsre", select=[7, 2, 500], start=1, limit=1)] == ["2"]
    message = load_error(ZSRE, "zsre", select=[54, 103])
    assert str(ZSRE) in message and "no edits selected" in message and "empty target" in message


# ------------------------------------------------------------------------------------------ KnowEdit


KNOWEDIT_ZSRE = {
    "subject": "Epaspidoceras",
    "prompt": "Which family does Epaspidoceras belong to?",
    "target_new": "Noctuidae",
    "ground_truth": ["Aspidoceratidae"],
    "rephrase_prompt": "What family are Epaspidoceras?",
    "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is", "ground_truth": ["genus"]}]},
    "portability": {"Reasoning": [{"prompt": "What is the biological order of Epaspidoceras?", "ground_truth": ["Lepidoptera"]}]},
}

KNOWEDIT_WIKI = {
    "subject": "Kuala Lumpur",
    "prompt": "The name of the country which Kuala Lumpur is associated with is",
    "target_new": "Malaysia Airlines",
    "ground_truth": "Malaysia",
    "rephrase": "Kuala Lumpur is associated with the country",
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The head of government of Kuala Lumpur is", "ground_truth": [["Maimunah Mohd Sharif", "Maimunah"]]},
        ],
        "Forgetfulness": [],
    },
    "portability": {
        "Subject_Aliasing": [{"prompt": "The country KL is associated with is", "ground_truth": ["Malaysia Airlines", "MAS"]}],
        "Logical_Generalization": [
            {"prompt": "The continent of the country Kuala Lumpur is associated with is", "ground_truth": [["Asia", "Asian continent"]]},
            {"prompt": "The capital of the country Kuala Lumpur is associated with is", "ground_truth": "Sepang"},
        ],
    },
}

KNOWEDIT_RECENT = {"subject": "Leo Arons", "prompt": "The place of death of Leo Arons is", "target_new": "Berlin", "locality": {}}


def test_knowedit_records(tmp_path):
    path = write_json(tmp_path, [KNOWEDIT_ZSRE, KNOWEDIT_WIKI, KNOWEDIT_RECENT])
    zsre, wiki, recent = load_edits(path, "knowedit")
    assert zsre == EditRecord(
        case_id="0",
        prompt="Which family does Epaspidoceras belong to?",
        target="Noctuidae",
        subject="Epaspidoceras",
        ground_truth="Aspidoceratidae",
        rephrases=("What family are Epaspidoceras?",),
        locality=(Probe("The taxon rank of Epaspidoceras is", "genus", "Relation_Specificity"),),
        portability=(Probe("What is the biological order of Epaspidoceras?", "Lepidoptera", "Reasoning"),),
    )
    assert wiki.ground_truth == "Malaysia" and wiki.rephrases == ("Kuala Lumpur is associated with the country",)
    assert wiki.locality == (Probe("The head of government of Kuala Lumpur is", "Maimunah Mohd Sharif", "Relation_Specificity"),)
    assert [(p.kind, p.answer) for p in wiki.portability] == [
        ("Subject_Aliasing", "Malaysia Airlines"),
        ("Logical_Generalization", "Asia"),
        ("Logical_Generalization", "Sepang"),
    ]
    assert (recent.case_id, recent.ground_truth, recent.rephrases, recent.locality) == ("2", None, (), ())


def test_knowedit_probe_without_answer_names_the_probe(tmp_path):
    bad = {**KNOWEDIT_ZSRE, "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is"}]}}
    path = write_json(tmp_path, [KNOWEDIT_ZSRE, bad])
    message = load_error(path, "knowedit")
    assert str(path) in message and "record 1" in message and "'locality.Relation_Specificity[0].ground_truth'" in message


# ------------------------------------------------------------------------------------------ CounterFact


ROME_COUNTERFACT = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native", "Danielle Darrieux spoke"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

FLAT_COUNTERFACT = {
    "case_id": 4,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux spoke",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
    "subject": "Danielle Darrieux",
}


def test_rome_counterfact(tmp_path):
    (edit,) = load_edits(write_json(tmp_path, [ROME_COUNTERFACT]), "counterfact")
    assert edit == EditRecord(
        case_id="0",
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
        ground_truth="French",
        rephrases=tuple(ROME_COUNTERFACT["paraphrase_prompts"]),
        locality=(
            Probe("The mother tongue of Léon Blum is", "French", "neighborhood"),
            Probe("The native language of Montesquieu is", "French", "neighborhood"),
        ),
    )


def test_flat_counterfact_detected_by_keys(tmp_path):
    rome, flat = load_edits(write_json(tmp_path, [ROME_COUNTERFACT, FLAT_COUNTERFACT]), "counterfact")
    assert (rome.prompt, rome.target) == (flat.prompt, flat.target)
    assert flat == EditRecord(
        case_id="4",
        prompt="The mother tongue of Danielle Darrieux is",
        target="English",
        subject="Danielle Darrieux",
        ground_truth="French",
        rephrases=("Danielle Darrieux spoke",),
        locality=(Probe("The mother tongue of Léon Blum is", "French", "neighborhood"),),
    )


def test_counterfact_missing_nested_target(tmp_path):
    bad = {**ROME_COUNTERFACT, "requested_rewrite": {**ROME_COUNTERFACT["requested_rewrite"], "target_new": {"id": "Q1860"}}}
    path = write_json(tmp_path, [ROME_COUNTERFACT, bad])
    message = load_error(path, "counterfact")
    assert str(path) in message and "record 1" in message and "'requested_rewrite.target_new.str'" in message


# ------------------------------------------------------------------------------------------ QAEdit


QAEDIT = {
    "id": "qa-17",
    "source": "nq",
    "prompt": "Who wrote the novel Frankenstein?",
    "target": "Mary Shelley",
    "subject": "Frankenstein",
    "rephrase": "Who is the author of Frankenstein?",
    "locality": [
        {"loc": "nq question: who sang the song africa", "loc_ans": "Toto"},
        {"loc": "nq question: capital city of australia", "loc_ans": "Canberra"},
    ],
}


def test_qaedit(tmp_path):
    (edit,) = load_edits(write_json(tmp_path, [QAEDIT], jsonl=True), "qaedit")
    assert edit == EditRecord(
        case_id="qa-17",
        prompt="Who wrote the novel Frankenstein?",
        target="Mary Shelley",
        subject="Frankenstein",
        rephrases=("Who is the author of Frankenstein?",),
        locality=(
            Probe("nq question: who sang the song africa", "Toto", "locality"),
            Probe("nq question: capital city of australia", "Canberra", "locality"),
        ),
    )


# ------------------------------------------------------------------------------------------ MQuAKE


MQUAKE = {
    "case_id": 7,
    "requested_rewrite": [
        {
            "prompt": "{} is a citizen of",
            "relation_id": "P27",
            "target_new": {"str": "Canada", "id": "Q16"},
            "target_true": {"str": "United States of America", "id": "Q30"},
            "subject": "Ellie Kemper",
            "question": "What is the country of citizenship of Ellie Kemper?",
        },
        {
            "prompt": "The capital of {} is",
            "relation_id": "P36",
            "target_new": {"str": "Ottawa", "id": "Q1930"},
            "target_true": {"str": "Toronto", "id": "Q172"},
            "subject": "Canada",
        },
    ],
    "questions": [
        "What is the capital of the country Ellie Kemper is a citizen of?",
        "Which city is the capital of Ellie Kemper's country?",
        "Ellie Kemper is a citizen of a country whose capital is what?",
    ],
    "answer": "Washington, D.C.",
    "answer_alias": ["Washington"],
    "new_answer": "Ottawa",
    "new_answer_alias": ["Ottawa, Ontario"],
    "single_hops": [],
    "new_single_hops": [],
}


def test_mquake_one_edit_per_rewrite(tmp_path):
    first, second = load_edits(write_json(tmp_path, [MQUAKE]), "mquake")
    assert (first.case_id, second.case_id) == ("7.0", "7.1")
    assert first.prompt == "What is the country of citizenship of Ellie Kemper?"  # its question, when there is one
    assert second.prompt == "The capital of Canada is"  # else the cloze with the subject filled in
    assert (first.target, first.ground_truth, first.subject) == ("Canada", "United States of America", "Ellie Kemper")
    assert (second.target, second.ground_truth, second.subject) == ("Ottawa", "Toronto", "Canada")
    assert first.portability == tuple(Probe(q, "Ottawa", "multi_hop") for q in MQUAKE["questions"])
    assert second.portability == () and first.locality == () and first.rephrases == ()


def test_mquake_errors_name_the_rewrite(tmp_path):
    bad = json.loads(json.dumps(MQUAKE))
    del bad["requested_rewrite"][1]["target_new"]
    path = write_json(tmp_path, [MQUAKE, bad])
    message = load_error(path, "mquake")
    assert str(path) in message and "record 1" in message and "'requested_rewrite[1].target_new.str'" in message
    no_answer = {k: v for k, v in MQUAKE.items() if k != "new_answer"}
    assert "'new_answer'" in load_error(write_json(tmp_path, [no_answer], "b.json"), "mquake")


def test_mquake_empty_target_drops_the_case(tmp_path):
    blank = json.loads(json.dumps(MQUAKE))
    blank["case_id"] = 8
    blank["requested_rewrite"][1]["target_new"]["str"] = " "
    edits = load_edits(write_json(tmp_path, [blank, MQUAKE]), "mquake")
    assert [e.case_id for e in edits] == ["7.0", "7.1"] and edits.skipped == (0,)


# ------------------------------------------------------------------------------------------ users' JSONL / CSV


def test_jsonl_default_field_names(tmp_path):
    rows = [
        {"prompt": "The capital of Atlantis is", "target": "Poseidonia"},
        {"prompt": "Q", "target": 1994, "case_id": "custom", "rephrases": ["R1", "R2"], "subject": "S", "ground_truth": "1990"},
    ]
    plain, full = load_edits(write_json(tmp_path, rows, "edits.jsonl", jsonl=True), "jsonl")
    assert plain == EditRecord(case_id="0", prompt="The capital of Atlantis is", target="Poseidonia")
    assert full == EditRecord(case_id="custom", prompt="Q", target="1994", subject="S", ground_truth="1990", rephrases=("R1", "R2"))


def test_jsonl_field_mapping(tmp_path):
    fields = {
        "prompt": "question",
        "target": "answer",
        "rephrases": "paraphrase",
        "locality_prompt": "unrelated",
        "locality_answer": "unrelated_answer",
        "subject": "entity",
        "case_id": "uid",
    }
    rows = [
        {"uid": "a1", "question": "Q1", "answer": "A1", "paraphrase": "P1", "unrelated": "U1", "unrelated_answer": "V1", "entity": "E1"},
        {
            "uid": "a2",
            "question": "Q2",
            "answer": "A2",
            "paraphrase": ["P2", "P2b"],
            "unrelated": ["U2", "U3"],
            "unrelated_answer": ["V2", "V3"],
            "entity": "E2",
        },
    ]
    path = write_json(tmp_path, rows, "mine.jsonl", jsonl=True)
    first, second = load_edits(path, "jsonl", fields=fields)
    locality = (Probe("U1", "V1", "locality"),)
    assert first == EditRecord(case_id="a1", prompt="Q1", target="A1", subject="E1", rephrases=("P1",), locality=locality)
    assert second.rephrases == ("P2", "P2b")
    assert second.locality == (Probe("U2", "V2", "locality"), Probe("U3", "V3", "locality"))
    # the same records as a JSON array read the same
    assert load_edits(write_json(tmp_path, rows, "mine.json"), "jsonl", fields=fields) == [first, second]


def test_csv_field_mapping(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text(
        "\ufeffquestion,answer,paraphrase,loc_q,loc_a,who\n"  # byte-order mark, as spreadsheets write it
        'Who leads Atlantis?,Queen Cleito,"[""Atlantis is led by"", ""The ruler of Atlantis is""]",What is 2+2?,4,Atlantis\n'
        "Where is Lemuria?,Indian Ocean,Lemuria lies in,,,\n",
        encoding="utf-8",
    )
    fields = {"prompt": "question", "target": "answer", "rephrases": "paraphrase", "subject": "who"}
    fields |= {"locality_prompt": "loc_q", "locality_answer": "loc_a"}
    first, second = load_edits(path, "csv", fields=fields)
    assert first == EditRecord(
        case_id="0",
        prompt="Who leads Atlantis?",
        target="Queen Cleito",
        subject="Atlantis",
        rephrases=("Atlantis is led by", "The ruler of Atlantis is"),
        locality=(Probe("What is 2+2?", "4", "locality"),),
    )
    assert second == EditRecord(case_id="1", prompt="Where is Lemuria?", target="Indian Ocean", rephrases=("Lemuria lies in",))


def test_csv_missing_mapped_column(tmp_path):
    path = tmp_path / "edits.csv"
    path.write_text("question,reply\nQ,A\n", encoding="utf-8")
    message = load_error(path, "csv", fields={"prompt": "question", "target": "answer"})
    assert str(path) in message and "record 0" in message and "'answer'" in message and "mapped to target" in message
    assert "fix `fields:`" in message and "it has: question, reply" in message


def test_jsonl_mapped_field_missing_in_one_record(tmp_path):
    rows = [{"question": "Q", "answer": "A"}] * 17 + [{"question": "Q"}]
    path = write_json(tmp_path, rows, "x.jsonl", jsonl=True)
    message = load_error(path, "jsonl", fields={"prompt": "question", "target": "answer"})
    assert message.startswith(f"{path}: record 17 has no 'answer' field (mapped to target")
    assert message.endswith("add it or fix `fields:`")


def test_jsonl_unmapped_target_suggests_a_mapping(tmp_path):
    path = write_json(tmp_path, [{"prompt": "Q", "answer": "A"}], "x.jsonl", jsonl=True)
    message = load_error(path, "jsonl")
    assert "record 0 has no 'target' field" in message and "`fields: {target: <column>}`" in message


def test_jsonl_locality_needs_both_prompt_and_answer(tmp_path):
    path = write_json(tmp_path, [{"prompt": "Q", "target": "A", "locality_prompt": "L"}], "x.jsonl", jsonl=True)
    message = load_error(path, "jsonl")
    assert str(path) in message and "record 0" in message and "'locality_answer'" in message


# ------------------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    message = load_error(path, "zsre")
    assert str(path) in message and "no such file" in message


def test_unreadable_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "target": "b"}\n\n{"prompt": "c", "target": }\n', encoding="utf-8")
    message = load_error(path, "jsonl")
    assert str(path) in message and "line 3" in message and "not valid JSON" in message


def test_unreadable_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"src": "a"},\n{"src": }\n]', encoding="utf-8")
    message = load_error(path, "zsre")
    assert str(path) in message and "line 3" in message


def test_single_json_object_is_not_a_dataset(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"prompt": "a", "target": "b"}, indent=2), encoding="utf-8")
    assert "not a list of records" in load_error(path, "jsonl")


def test_non_object_record(tmp_path):
    path = write_json(tmp_path, [{"prompt": "a", "target": "b"}, ["a", "b"]])
    message = load_error(path, "jsonl")
    assert str(path) in message and "record 1 is a JSON list, not an object" in message


def test_unknown_format_suggests_a_name(tmp_path):
    path = write_json(tmp_path, [QAEDIT])
    message = load_error(path, "zrse")
    assert f"{path}: unknown dataset format 'zrse'" in message and "did you mean 'zsre'" in message
    assert load_edits(path, "QAEdit")[0].case_id == "qa-17"  # names are case-insensitive


def test_missing_required_field_names_file_record_and_key(tmp_path):
    raw = json.loads(ZSRE.read_text(encoding="utf-8"))[:3]
    del raw[1]["alt"]
    path = write_json(tmp_path, raw)
    message = load_error(path, "zsre")
    assert message.startswith(f"{path}: record 1 has no 'alt' field (it has: subject, src, pred")
    assert "check that the file is in 'zsre' format" in message


def test_wrong_format_points_at_the_right_one(tmp_path):
    path = write_json(tmp_path, [KNOWEDIT_ZSRE])
    message = load_error(path, "zsre")
    assert str(path) in message and "record 0 has no 'src' field" in message and "looks like format 'knowedit'" in message


def test_empty_prompt_and_non_text_fields(tmp_path):
    path = write_json(tmp_path, [{**QAEDIT, "prompt": "  "}])
    assert "record 0 has an empty 'prompt'" in load_error(path, "qaedit")
    path = write_json(tmp_path, [{**QAEDIT, "target": {"str": "x"}}], "b.json")
    assert "record 0 has 'target' = {\"str\": \"x\"}, which is not text" in load_error(path, "qaedit")


def test_empty_targets_skipped_or_raised(tmp_path):
    rows = [{"prompt": "Q0", "target": "A0"}, {"prompt": "Q1", "target": "  "}, {"prompt": "Q2", "target": "A2"}]
    path = write_json(tmp_path, rows, "x.jsonl", jsonl=True)
    edits = load_edits(path, "jsonl")
    assert [e.case_id for e in edits] == ["0", "2"] and edits.skipped == (1,)
    message = load_error(path, "jsonl", skip_empty_targets=False)
    assert str(path) in message and "record 1 has an empty target ('target' is blank)" in message


def test_no_edits_selected(tmp_path):
    path = write_json(tmp_path, [{"prompt": "Q", "target": "A"}] * 3, "x.jsonl", jsonl=True)
    for kwargs in ({"limit": 0}, {"start": 3}):
        message = load_error(path, "jsonl", **kwargs)
        assert str(path) in message and "no edits selected" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert "no edits selected (the file has 0 record(s)" in load_error(empty, "jsonl")


def test_bad_selection(tmp_path):
    path = write_json(tmp_path, [{"prompt": "Q", "target": "A"}] * 3, "x.jsonl", jsonl=True)
    assert "select has 3, but the file's records are numbered 0..2" in load_error(path, "jsonl", select=[0, 3])
    assert "select lists record 1 twice" in load_error(path, "jsonl", select=[1, 2, 1])
    assert "start must be a whole number >= 0" in load_error(path, "jsonl", start=-1)
    assert "limit must be a whole number >= 0" in load_error(path, "jsonl", limit="10")


def test_bad_field_mappings(tmp_path):
    path = write_json(tmp_path, [QAEDIT])
    assert f"{path}: `fields:` only applies to the jsonl and csv formats" in load_error(path, "qaedit", fields={"prompt": "q"})
    message = load_error(path, "jsonl", fields={"promt": "q"})
    assert "unknown key 'promt'" in message and "did you mean 'prompt'" in message
    assert "maps 'target' to" in load_error(path, "jsonl", fields={"target": ""})
