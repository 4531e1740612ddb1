"""Published numbers: one file, every key the chapters quote present, clear errors."""
import pytest

from pruning_lib import reference
from pruning_lib.chapters import bernoulli_gates
from pruning_lib.chapters import lottery_tickets as lottery
from pruning_lib.chapters import dense_baselines as baselines


def test_every_key_the_chapters_quote_is_in_the_file():
    keys = (list(baselines.PUBLISHED_ERROR.values()) + list(bernoulli_gates.PUBLISHED_KEYS)
            + list(lottery.SNIP_PUBLISHED.values()))
    table = reference.published()
    assert set(keys) <= set(table["key"])
    assert table["value"].between(0, 1).all()  # errors are fractions, shown as percentages


def test_numbers_and_labels():
    row = reference.number("snip_lenet300_100_sparsity98")
    assert row["value"] == pytest.approx(0.024)
    assert reference.label(row) == "Lee et al. 2019 (SNIP), Table 1; full MNIST"
    assert set(reference.published(model="lenet5_caffe")["key"]) == {
        "snip_dense_lenet5_caffe", "bcgnj_lenet5_caffe", "sbp_lenet5_caffe"}


def test_a_missing_key_names_the_file_and_the_keys(tmp_path):
    with pytest.raises(KeyError, match="no published number 'nope' in .*published.csv; keys: snip_dense"):
        reference.number("nope")


def test_a_malformed_file_is_refused(tmp_path):
    bad = tmp_path / "published.csv"
    bad.write_text("key,value\na,0.1\n")
    with pytest.raises(ValueError, match="missing column"):
        reference.published(bad)
    dup = tmp_path / "dup.csv"
    dup.write_text(",".join(reference.COLUMNS) + "\n" + "a,p,s,m,d,x,,test_error,0.1\n" * 2)
    with pytest.raises(ValueError, match="duplicated key"):
        reference.published(dup)
