import codecs
import json

import pytest

from bbpt.errors import ConfigError, DataError
from bbpt.tasks import Example, Template, load_task
from bbpt.tasks.builtin import CLASSIFICATION
from bbpt.tasks.loaders import read_examples


@pytest.mark.parametrize("name", sorted(CLASSIFICATION))
def test_builtin_tasks_split_few_shot(name):
    task = load_task(task=name, shots=4, seed=1)
    k = task.num_classes
    assert len(task.train) == len(task.dev) == 4 * k
    assert {e.label for e in task.train} == set(range(k))
    assert not {(e.text, e.text_pair) for e in task.train} & {(e.text, e.text_pair) for e in task.dev}
    assert len(task.test) > 100
    before, after = task.template.render(task.train[0])
    assert before == "" and task.train[0].text in after


def test_split_is_deterministic_by_seed():
    a, b, c = (load_task(task="sst2", shots=8, seed=s) for s in (3, 3, 4))
    assert a.train == b.train and a.dev == b.dev
    assert a.train != c.train


def test_a_larger_dev_set_leaves_train_as_it_was():
    base = load_task(task="sst2", shots=16, seed=2)
    big = load_task(task="sst2", shots=16, seed=2, dev_shots=64)
    assert big.train == base.train
    assert len(big.dev) == 2 * 64 and {e.label for e in big.dev} == {0, 1}
    assert sum(e.label for e in big.dev) == 64
    assert not {e.text for e in big.train} & {e.text for e in big.dev}
    assert {e.text for e in base.dev} <= {e.text for e in big.dev}     # the larger set extends the smaller one


def test_template_errors_name_the_value():
    with pytest.raises(ConfigError, match=r"no \{text\}"):
        Template("Sentiment:")
    with pytest.raises(ConfigError, match="unknown field"):
        Template("{text} {review}")


def test_template_infix_split():
    t = Template("Review: {text}\n{prompt}Sentiment:")
    assert t.placement == "infix"
    assert t.render(Example("great", 1)) == ("Review: great\n", "Sentiment:")
    assert Template("{prompt}{text}").placement == "prefix"


def test_custom_data_and_label_names(sst2_jsonl):
    task = load_task(data=str(sst2_jsonl), template="Review: {text}\nSentiment:",
                     labels=[" negative", " positive"], shots=4, seed=0)
    assert len(task.train) == 8 and len(task.test) == 80 - 16


def test_unknown_label_names_line_and_value(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok", "label": "neutral"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1 has label 'neutral'.*negative"):
        load_task(data=str(p), template="{text}", labels=[" negative", " positive"])


def test_empty_and_malformed_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="has no examples"):
        load_task(data=str(empty), template="{text}", labels=[" a", " b"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": 0}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        load_task(data=str(bad), template="{text}", labels=[" a", " b"])
    nofield = tmp_path / "nofield.csv"
    nofield.write_text("sentence,label\nhi,0\n")
    with pytest.raises(DataError, match="no field 'text'.*--text-field"):
        load_task(data=str(nofield), template="{text}", labels=[" a", " b"])


def test_a_file_that_is_not_utf8_names_the_line_what_is_there_and_the_fix(tmp_path):
    kw = dict(template="{text}", labels=[" a", " b"])
    export = tmp_path / "export.csv"
    export.write_bytes("text,label\nfine,0\n".encode("utf-16"))        # a spreadsheet's UTF-16 export
    with pytest.raises(DataError, match=r"export.csv:1 is not UTF-8 text: it starts with b'\\xff\\xfe', the "
                                        r"byte-order mark of UTF-16.*save it as UTF-8.*iconv -f UTF-16"):
        load_task(data=str(export), **kw)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2 is not UTF-8 text: byte b'\\xe9' at offset 40"):
        load_task(data=str(latin), **kw)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    excel = tmp_path / "excel.csv"          # what a spreadsheet's "CSV UTF-8" writes
    excel.write_bytes(codecs.BOM_UTF8 + "text,label\ncafé,0\n".encode())
    assert read_examples(excel, label_names=["a", "b"]) == [Example("café", 0)]


def test_unknown_task_and_too_few_examples(sst2_jsonl):
    with pytest.raises(ConfigError, match="unknown task 'sst3'"):
        load_task(task="sst3")
    with pytest.raises(DataError, match="--shots 30 and --dev-shots 30 need 60"):
        load_task(data=str(sst2_jsonl), template="{text}", labels=[" a", " b"], shots=30)
    with pytest.raises(DataError, match="--shots 4 and --dev-shots 100 need 104 .*lower them"):
        load_task(data=str(sst2_jsonl), template="{text}", labels=[" a", " b"], shots=4, dev_shots=100)
    with pytest.raises(ConfigError, match="--dev-shots must be at least 1, got 0"):
        load_task(task="sst2", dev_shots=0)
