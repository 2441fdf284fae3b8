import pandas as pd

from helpers.datasets import cfg

from psdclip.pipeline.keys import url_key
from psdclip.pipeline.dataset import Layout
from psdclip.pipeline.ingest import ingest_inputs


def ingest_csv(tmp_path, scheduler, name, rows, earlier=(), ds="ds"):
    """Plan one csv list (after the lists in `earlier`) with the partitioned ingest on the shared cluster."""
    from dask.distributed import Client

    layout = Layout(str(tmp_path / ds))
    layout.create()
    with Client(scheduler) as client:
        for i, (n, r) in enumerate(list(earlier) + [(name, rows)]):
            pd.DataFrame(r, columns=["url", "caption"]).to_csv(tmp_path / n, index=False)
            ingest_inputs(client, layout, cfg([tmp_path / n], layout.root))
    return layout.load_plan(len(earlier)).sort_values("source_row").reset_index(drop=True)


def test_duplicates_keep_the_first_and_keys_are_stable_and_unique(tmp_path, scheduler):
    urls = ["http://a.test/1", "http://a.test/2", "http://a.test/1", "http://a.test/1"]
    df = ingest_csv(tmp_path, scheduler, "l.csv", [(u, "c") for u in urls])
    assert df["status"].tolist() == ["pending", "pending", "duplicate_url", "duplicate_url"]
    assert df.loc[0, "key"] == url_key("http://a.test/1")
    assert df["key"].is_unique
    again = ingest_csv(tmp_path, scheduler, "l.csv", [(u, "c") for u in urls], ds="again")
    assert again["key"].tolist() == df["key"].tolist()


def test_duplicates_against_the_existing_dataset_and_filtered_rows_dont_count(tmp_path, scheduler):
    rows = [("http://a.test/1", "c"), ("http://a.test/2", ""), ("http://a.test/2", "c")]
    df = ingest_csv(tmp_path, scheduler, "new.csv", rows, earlier=[("old.csv", [("http://a.test/1", "c")])])
    assert df["status"].tolist() == ["duplicate_url", "empty_caption", "pending"]
    assert df["key"].is_unique
