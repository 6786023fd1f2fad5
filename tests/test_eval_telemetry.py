import json
import re

from quark.eval.telemetry import Telemetry


def test_summary_prometheus_and_jsonl(tmp_path):
    t = Telemetry(tmp_path / "t.jsonl")
    for s in (0.001, 0.02, 0.2, 3.0):
        t.observe("latency", s)
    t.count("requests", 4)
    t.gauge("queue_depth", 2)
    with t.timer("latency"):
        pass
    s = t.summary()
    assert s["requests_total"] == 4 and s["latency_count"] == 5 and s["latency_p50"] <= s["latency_p90"]
    text = t.prometheus()
    assert "# TYPE quark_latency_seconds histogram" in text
    assert 'quark_latency_seconds_bucket{le="0.025"} 3' in text
    assert 'quark_latency_seconds_bucket{le="+Inf"} 5' in text
    assert re.search(r"^quark_requests_total 4$", text, re.M) and re.search(r"^quark_queue_depth 2$", text, re.M)
    events = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(events) == 7 and {e["kind"] for e in events} == {"latency", "counter", "gauge"}
