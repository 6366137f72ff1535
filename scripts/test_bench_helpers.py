"""Tests of scripts/bench_helpers.py: the parsers of each load tool's
output, the result records, the generated SQL and the report's verdicts.

Run: python3 -m unittest discover -s scripts -p 'test_*.py'
"""

import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_helpers as h  # noqa: E402


def write(directory, name, text):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


class Parsers(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def test_loadgen_takes_the_last_json_line_and_rates_increments(self):
        path = write(self.dir, "lg", 'loadgen: POST ...\n{"rps": 1.0, "ips": 2.0}\nnoise\n{"rps": 10.0, "ips": 1000.0, "p99_ms": 1.5}\n')
        out = h.parse("loadgen", path)
        self.assertEqual(out["rate"], 1000.0)
        self.assertEqual(out["p99_ms"], 1.5)

    def test_pgbench(self):
        path = write(self.dir, "pg", "latency average = 0.812 ms\ntps = 7801.5 (without initial connection time)\n"
                                     "number of transactions actually processed: 78015\n")
        out = h.parse("pgbench", path)
        self.assertEqual((out["rate"], out["lat_avg_ms"], out["requests"], out["failed"]), (7801.5, 0.812, 78015, 0))

    def test_redis_csv(self):
        path = write(self.dir, "redis", '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
                                        '"INCR","86000.00","0.5","0.1","0.4","0.8","1.2","3.0"\n')
        out = h.parse("redis", path)
        self.assertEqual((out["rate"], out["p50_ms"], out["p99_ms"], out["max_ms"]), (86000.0, 0.4, 1.2, 3.0))

    def test_wrk_units_are_milliseconds(self):
        path = write(self.dir, "wrk", "  Latency Distribution\n     50%  250.00us\n     99%    2.50ms\n"
                                      "Requests/sec:  95000.10\nNon-2xx or 3xx responses: 3\n")
        out = h.parse("wrk", path)
        self.assertEqual(out["rate"], 95000.1)
        self.assertAlmostEqual(out["p50_ms"], 0.25)
        self.assertAlmostEqual(out["p99_ms"], 2.5)
        self.assertEqual(out["non2xx"], 3)

    def test_psql_takes_the_last_timing(self):
        path = write(self.dir, "psql", "Time: 10.5 ms\nINSERT 0 5\nTime: 812.25 ms\n")
        self.assertEqual(h.parse("psql", path)["ms"], 812.25)

    def test_output_without_a_result_is_an_error(self):
        for kind in ("loadgen", "pgbench", "redis", "wrk", "psql"):
            with self.assertRaises(SystemExit, msg=kind):
                h.parse(kind, write(self.dir, kind, "nothing useful\n"))


class Records(unittest.TestCase):
    def test_a_record_merges_fields_output_and_cpu(self):
        d = tempfile.mkdtemp()
        out = write(d, "out", "Time: 500 ms\n")
        cpu = write(d, "cpu", json.dumps({"others_pct": 3.0}))
        printed = []
        real_print = print
        try:
            h.print = lambda text: printed.append(text)
            h.record("psql", out, cpu, "", ["scenario=flush", "config=raw", "round=2", "keys=1000"])
        finally:
            h.print = real_print
        rec = json.loads(printed[0])
        self.assertEqual((rec["scenario"], rec["round"], rec["others_pct"]), ("flush", 2, 3.0))
        self.assertEqual(rec["rate"], 2000.0, "keys per second of the statement")

    def test_generated_sql_upserts_every_key_once(self):
        d = tempfile.mkdtemp()
        path = os.path.join(d, "x.sql")
        h.gensql(3, "p:", "raw", path)
        sql = open(path).read()
        self.assertIn("{p:k0,p:k1,p:k2}", sql)
        self.assertIn("ON CONFLICT (key) DO UPDATE SET value = raw.value + excluded.value", sql)

    def test_medians_and_formatting(self):
        self.assertEqual(h.median_of([{"r": 1}, {"r": 5}, {"r": 3}, {"x": 9}], "r"), 3)
        self.assertIsNone(h.median_of([], "r"))
        self.assertEqual((h.fmt(None), h.fmt(123456.7), h.fmt(1.234, 2)), ("–", "123,457", "1.23"))


class Report(unittest.TestCase):
    def render(self, service, floor):
        d = tempfile.mkdtemp()
        results = write(d, "r", "".join(json.dumps(r) + "\n" for r in [
            {"scenario": "direct", "config": "service_hot", "round": 1, "rate": service, "p99_ms": 1.5, "others_pct": 0},
            {"scenario": "direct", "config": "floor", "round": 1, "rate": floor, "p99_ms": 1.2, "others_pct": 0},
        ]))
        meta = write(d, "m", "date=2026-12-02\ngit=abc\n")
        out = os.path.join(d, "out.md")
        h.render(results, meta, out, True)
        return open(out).read()

    def test_the_hot_key_ratio_passes_and_fails_against_its_target(self):
        row = lambda md: next(l for l in md.splitlines() if l.startswith("| direct hot: service / poem floor"))
        self.assertTrue(row(self.render(90_000, 100_000)).endswith("PASS |"))
        self.assertTrue(row(self.render(80_000, 100_000)).endswith("FAIL |"))

    def test_missing_measurements_are_not_judged(self):
        md = self.render(90_000, 100_000)
        zipf = next(l for l in md.splitlines() if l.startswith("| direct zipf: service / poem floor"))
        self.assertTrue(zipf.endswith("n/a |"), zipf)

    def test_the_keys_rows_judge_tail_ratios_downwards_and_memory_per_key(self):
        d = tempfile.mkdtemp()
        rec = lambda cfg, **kw: {"scenario": "keys", "config": cfg, "round": 1, "others_pct": 0, **kw}
        results = write(d, "r", "\n".join(json.dumps(r) for r in [
            rec("service_uniform", rate=70_000),
            rec("floor_uniform", rate=100_000),
            rec("half_service_hot", rate=40_000, p99_ms=1.4),
            rec("half_floor_hot", rate=40_000, p99_ms=1.0),
            rec("half_service_zipf", rate=40_000, p99_ms=1.6),
            rec("half_floor_zipf", rate=40_000, p99_ms=1.0),
            rec("service_uniform_1m", rate=80_000, pending=500_000, bytes_per_key=390.0),
        ]))
        out = os.path.join(d, "out.md")
        h.render(results, write(d, "m", "git=abc\n"), out, False)
        rows = {l.split(" | ")[0][2:]: l for l in open(out).read().splitlines() if l.startswith("| keys, ")}
        self.assertTrue(rows["keys, 100k uniform, default 1 s flush: service / poem floor"].endswith("FAIL |"))
        hot = rows["keys, p99 at half the maximum, hot: service / floor at the same rate (open loop)"]
        self.assertIn("| 1.40 | 1.00 | 1.40× | <= 1.5× | PASS |", hot)
        zipf = rows["keys, p99 at half the maximum, zipf: service / floor at the same rate (open loop)"]
        self.assertTrue(zipf.endswith("FAIL |"), zipf)
        uniform = rows["keys, p99 at half the maximum, uniform: service / floor at the same rate (open loop)"]
        self.assertTrue(uniform.endswith("n/a |"), uniform)
        memory = next(v for k, v in rows.items() if k.startswith("keys, 1M uniform"))
        self.assertIn("390 B/key", memory)
        self.assertTrue(memory.endswith("FAIL |"), memory)


if __name__ == "__main__":
    unittest.main()
