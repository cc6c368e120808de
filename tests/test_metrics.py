"""Metrics shared by several worker processes add up to the whole server's."""

from __future__ import annotations

from nnwheel.serving.metrics import ServeMetrics, SharedMetrics


def observed(*requests: tuple[str, int, float], rows: tuple[int, ...] = ()) -> ServeMetrics:
    metrics = ServeMetrics(model="digits-mlp", batching=True)
    for route, status, seconds in requests:
        metrics.observe_request(route, status, seconds)
    for count in rows:
        metrics.observe_model_call(count)
    return metrics


def test_round_trip_through_json():
    metrics = observed(("/predict", 200, 0.003), ("/predict", 400, 0.2), ("/metrics", 200, 0.001), rows=(1, 8))
    copy = ServeMetrics.from_json("digits-mlp", True, metrics.to_json())
    assert copy.render() == metrics.render()


def test_every_worker_counts_whichever_answers(tmp_path):
    one = observed(("/predict", 200, 0.003), ("/predict", 200, 0.004), rows=(2,))
    two = observed(("/predict", 200, 0.3), ("/predict", 400, 0.001), ("/v2", 200, 0.001), rows=(1, 1))
    everything = observed(
        ("/predict", 200, 0.003), ("/predict", 200, 0.004), ("/predict", 200, 0.3), ("/predict", 400, 0.001),
        ("/v2", 200, 0.001), rows=(2, 1, 1),
    )
    first, second = SharedMetrics(one, tmp_path, worker="1"), SharedMetrics(two, tmp_path, worker="2")
    second.publish()
    assert first.render() == everything.render()  # the first worker publishes its own counts as it answers
    assert second.render() == everything.render()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["1.json", "2.json"]  # no partial file left


def test_a_later_count_replaces_the_workers_earlier_one(tmp_path):
    metrics = observed(("/predict", 200, 0.003))
    shared = SharedMetrics(metrics, tmp_path, worker="1")
    shared.publish()
    metrics.observe_request("/predict", 200, 0.003)
    assert 'nnwheel_requests_total{route="/predict",code="200"} 2' in shared.render()
