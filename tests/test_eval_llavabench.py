"""LLaVA-Bench judge flow against a local OpenAI-compatible server scripted per question:
good replies, garbage, HTTP 500, timeouts, a server that dies (then resume), shuffled answer files."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drip_llava.eval import llavabench
from drip_llava.eval.judge import JudgeClient, JudgeError, chat_completions_url
from drip_llava.eval.llavabench import context_text, parse_score, summarize
from drip_llava.jsonl import read_jsonl

QUESTION_RE = re.compile(r"\[Question\]\n(.*?)\n\n\[Assistant 1\]", re.S)


class JudgeServer:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1 (random port). ``script`` maps a question
    text to the behaviours of its successive requests: ("ok", reply) | ("status", code) |
    ("sleep", seconds, reply) | ("drop",). After ``die_after`` requests every request is dropped."""

    def __init__(self, script=None, default_reply="5 5\nok", die_after=None, status_all=None):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default_reply, self.die_after, self.status_all = default_reply, die_after, status_all
        self.requests = []  # (question, headers dict, payload)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return None

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                m = QUESTION_RE.search(body["messages"][-1]["content"])
                question = m.group(1) if m else None
                with server.lock:
                    server.requests.append((question, dict(self.headers), body, self.path))
                    n = len(server.requests)
                    queue = server.script.get(question)
                    action = queue.pop(0) if queue else ("ok", server.default_reply)
                if server.die_after is not None and n > server.die_after:
                    action = ("drop",)
                if server.status_all:
                    action = ("status", server.status_all)
                if action[0] == "drop":
                    return None  # close without any response
                if action[0] == "status":
                    return self._send(action[1], {"error": {"message": "scripted failure"}})
                if action[0] == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                self._send(200, {"id": "x", "object": "chat.completion", "model": "judge-snap-1",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": action[1]}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return None  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def asked(self, question):
        return sum(q == question for q, *_ in self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# question_id, category, image, question text
QUESTIONS = [
    (1, "conv", "001.jpg", "What color is the car?"),
    (2, "detail", "001.jpg", "Describe the image in detail."),
    (3, "complex", "002.jpg", "Why might the man be running?"),
    (4, "conv", "002.jpg", "How many people are there?"),
    (5, "detail", "002.jpg", "Describe the scene."),
]
RULES = {f"llava_bench_{c}": {"role": "Assistant", "prompt": f"Rate {c}. Output two scores on the first line."}
         for c in ("conv", "detail", "complex")}


@pytest.fixture()
def bench(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()

    def dump(name, recs):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))

    dump("questions.jsonl", [{"question_id": q, "category": c, "image": im, "text": t} for q, c, im, t in QUESTIONS])
    dump("answers_gpt4.jsonl", [{"question_id": q, "answer_id": f"ref{q}", "text": f"reference answer {q}"}
                                for q, *_ in QUESTIONS])
    # our answers: shuffled and with string ids, so line order pairing would be wrong
    ours = [{"question_id": str(q), "answer_id": f"ours{q}", "prompt": t, "text": f"our answer {q}"}
            for q, _, _, t in QUESTIONS]
    dump("answers.jsonl", [ours[i] for i in (3, 0, 4, 2, 1)])
    dump("context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A red car parked on a street."},
                           {"id": "002", "image": "002.jpg", "caption": "Two men running in a park."}])
    (d / "rule.json").write_text(json.dumps(RULES))
    return d


def review_args(d, url, out, *extra):
    return ["review", "--questions", str(d / "questions.jsonl"), "--answers", str(d / "answers.jsonl"),
            "--reference", str(d / "answers_gpt4.jsonl"), "--context", str(d / "context.jsonl"),
            "--rule", str(d / "rule.json"), "--judge-model", "judge-x", "--judge-base-url", url,
            "--output", str(out), "--timeout", "0.5", "--max-retries", "2", "--backoff", "0.01", *extra]


def read_reviews(path):
    return read_jsonl(path)


def test_parse_score():
    assert parse_score("8 9\nBecause...") == (8.0, 9.0)
    assert parse_score("8, 9") == (8.0, 9.0)
    assert parse_score("7.5,8") == (7.5, 8.0)
    assert parse_score(" 6  4 \r\nmore") == (6.0, 4.0)
    for bad in ("", "8 9 10", "Scores: 8 9", "eight nine", "nan 3", "8\n9", "Assistant 1: 8"):
        assert parse_score(bad) is None, bad


def test_context_formats():
    assert context_text({"image": "a", "caption": "one line"}) == "one line"
    coco = {"image": "a", "captions": ["c1", "c2"], "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]}]}
    assert context_text(coco) == "c1\nc2\n\ndog: [0.1, 0.2, 0.3, 0.4]"


def test_chat_url():
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_review_good_garbage_500_timeout(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    t = {q: text for q, _, _, text in QUESTIONS}
    script = {
        t[1]: [("ok", "8 9\nAssistant 2 is more precise.")],
        t[2]: [("ok", "I think both answers are fine.\n8 8")],          # garbage first line
        t[3]: [("status", 500), ("ok", "6, 3\nreasons")],                # 500, then success on retry
        t[4]: [("sleep", 1.5, "9 9\nlate"), ("ok", "7 7\nfine")],        # timeout, then success
        t[5]: [("ok", "10 5\nmeh")],
    }
    out = tmp_path / "reviews" / "review.jsonl"
    with JudgeServer(script) as srv:
        assert llavabench.main(review_args(bench, srv.url, out)) == 0
    assert [srv.asked(t[q]) for q in range(1, 6)] == [1, 1, 2, 2, 1]
    revs = {r["question_id"]: r for r in read_reviews(out)}
    assert sorted(revs) == [1, 2, 3, 4, 5]
    assert revs[1]["tuple"] == [8.0, 9.0] and revs[1]["parse_error"] is False
    assert revs[2]["tuple"] is None and revs[2]["parse_error"] is True
    assert revs[2]["content"].startswith("I think both")
    assert revs[3]["tuple"] == [6.0, 3.0] and revs[4]["tuple"] == [7.0, 7.0]
    assert revs[1]["answer1_id"] == "ref1" and revs[1]["answer2_id"] == "ours1"
    assert revs[1]["category"] == "conv" and revs[1]["rule"] == "llava_bench_conv"
    assert revs[1]["judge_model"] == "judge-x" and revs[1]["judge_model_reported"] == "judge-snap-1"

    # the request: LLaVA's prompt, paired by question_id although our answers were shuffled
    q, headers, payload, path = next(r for r in srv.requests if r[0] == t[3])
    assert path == "/v1/chat/completions"
    assert "Authorization" not in headers
    assert payload["model"] == "judge-x" and payload["temperature"] == 0.2
    assert payload["messages"][0] == {"role": "system", "content": llavabench.SYSTEM_PROMPT}
    assert payload["messages"][1]["content"] == (
        "[Context]\nTwo men running in a park.\n\n[Question]\nWhy might the man be running?\n\n"
        "[Assistant 1]\nreference answer 3\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nour answer 3\n\n[End of Assistant 2]\n\n"
        "[System]\nRate complex. Output two scores on the first line.\n\n")

    # summary numbers by hand: conv (8,9),(7,7); detail (10,5) + 1 parse error; complex (6,3)
    summary_path = tmp_path / "summary.json"
    capsys.readouterr()
    assert llavabench.main(["summarize", "--review", str(out), "--out", str(summary_path)]) == 0
    table = capsys.readouterr().out
    s = json.loads(summary_path.read_text())
    c = s["categories"]
    assert list(c) == ["conv", "detail", "complex"]
    assert c["conv"]["n"] == 2 and c["conv"]["relative_score"] == pytest.approx(8.0 / 7.5 * 100)
    assert c["detail"]["n"] == 1 and c["detail"]["parse_errors"] == 1
    assert c["detail"]["relative_score"] == pytest.approx(50.0)
    assert c["complex"]["relative_score"] == pytest.approx(50.0)
    assert s["overall"]["n"] == 4 and s["overall"]["parse_errors"] == 1
    assert s["overall"]["mean_reference"] == pytest.approx(7.75) and s["overall"]["mean_model"] == pytest.approx(6.0)
    assert s["overall"]["relative_score"] == pytest.approx(6.0 / 7.75 * 100)
    assert re.search(r"conv\s+2\s+0\s+7\.500\s+8\.000\s+106\.7", table)
    assert re.search(r"all\s+4\s+1\s+7\.750\s+6\.000\s+77\.4", table)
    # LLaVA's script averages the parse error in as (-1, -1): detail (10,5),(-1,-1); all ref 30/5, model 23/5
    assert s["llava"] == {"all": [76.7, 60.0, 46.0], "complex": [50.0, 60.0, 30.0], "conv": [106.7, 75.0, 80.0],
                          "detail": [44.4, 45.0, 20.0]}
    assert "\nall 76.7 60.0 46.0\ncomplex 50.0 60.0 30.0\nconv 106.7 75.0 80.0\ndetail 44.4 45.0 20.0\n" in table


def test_resume_after_server_dies(bench, tmp_path):
    out = tmp_path / "review.jsonl"
    with JudgeServer(default_reply="6 3\nx", die_after=2) as srv:
        assert llavabench.main(review_args(bench, srv.url, out, "--max-retries", "1")) == 1
    first = read_reviews(out)
    assert [r["question_id"] for r in first] == [1, 2]
    # a run killed mid-write leaves a torn last line: it is dropped and that question asked again
    with open(out, "a") as f:
        f.write('{"id": 3, "question_id": 3, "cont')
    with JudgeServer(default_reply="4 8\ny") as srv2:
        assert llavabench.main(review_args(bench, srv2.url, out)) == 0
    asked = sorted(q for q, *_ in srv2.requests)
    assert asked == sorted(t for q, _, _, t in QUESTIONS if q in (3, 4, 5))  # answered ones not re-asked
    revs = read_reviews(out)
    assert [r["question_id"] for r in revs] == [1, 2, 3, 4, 5]
    assert revs[0]["tuple"] == [6.0, 3.0] and revs[4]["tuple"] == [4.0, 8.0]
    # a complete rerun asks nothing
    with JudgeServer() as srv3:
        assert llavabench.main(review_args(bench, srv3.url, out)) == 0
    assert srv3.requests == []


def test_retry_parse_errors_and_concurrency(bench, tmp_path):
    t = {q: text for q, _, _, text in QUESTIONS}
    out = tmp_path / "review.jsonl"
    with JudgeServer({t[2]: [("ok", "no idea")]}, default_reply="5 4\nz") as srv:
        assert llavabench.main(review_args(bench, srv.url, out, "--concurrency", "3")) == 0
    assert len(srv.requests) == 5
    assert sum(r["parse_error"] for r in read_reviews(out)) == 1
    with JudgeServer(default_reply="9 9\nz") as srv2:
        assert llavabench.main(review_args(bench, srv2.url, out, "--retry-parse-errors")) == 0
    assert [q for q, *_ in srv2.requests] == [t[2]]
    revs = {r["question_id"]: r for r in read_reviews(out)}
    assert len(read_reviews(out)) == 5 and revs[2]["tuple"] == [9.0, 9.0]


def test_fatal_auth_error_stops_and_key_is_sent(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    out = tmp_path / "review.jsonl"
    with JudgeServer(status_all=401) as srv:
        assert llavabench.main(review_args(bench, srv.url, out)) == 2
    assert len(srv.requests) == 1  # no retries, no further questions
    assert srv.requests[0][1]["Authorization"] == "Bearer sk-test-123"
    assert read_reviews(out) == []


def test_client_gives_up_after_retries():
    sleeps = []
    with JudgeServer(status_all=503) as srv:
        client = JudgeClient(srv.url, "m", timeout=1, max_retries=3, backoff=0.5, max_backoff=1.5,
                             sleep=sleeps.append)
        with pytest.raises(JudgeError, match="HTTP 503"):
            client.chat([{"role": "user", "content": "[Question]\nq\n\n[Assistant 1]"}])
    assert len(srv.requests) == 4
    assert sleeps == [0.5, 1.0, 1.5]  # exponential, capped


def test_missing_answers_skipped_and_counted(bench, tmp_path, capsys):
    lines = (bench / "answers.jsonl").read_text().splitlines()
    (bench / "answers.jsonl").write_text("".join(x + "\n" for x in lines if '"question_id": "5"' not in x))
    out = tmp_path / "review.jsonl"
    with JudgeServer(default_reply="5 5") as srv:
        assert llavabench.main(review_args(bench, srv.url, out)) == 0
    assert len(srv.requests) == 4
    assert "skipped 1 without our answer" in capsys.readouterr().out


def test_summarize_llava_files(tmp_path, capsys):
    """LLaVA's own review files: 'llava_bench_' categories and [-1, -1] failures (excluded in ours); LLaVA's
    summarize_gpt_review.py numbers, worked by hand: means rounded to 3 decimals, failures averaged in."""
    recs = [{"question_id": 1, "category": "llava_bench_conv", "tuple": [1, 1]},
            {"question_id": 2, "category": "llava_bench_conv", "tuple": [1, 1]},
            {"question_id": 3, "category": "llava_bench_conv", "tuple": [2, 3]},
            {"question_id": 4, "category": "llava_bench_detail", "tuple": [8, 6]},
            {"question_id": 5, "category": "llava_bench_detail", "tuple": [-1, -1]},
            {"question_id": 6, "category": "llava_bench_complex", "tuple": [10, 9]}]
    review = tmp_path / "review.jsonl"
    review.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert llavabench.main(["summarize", "--review", str(review)]) == 0
    # conv: 1.667 / 1.333 -> 125.1 (unrounded means: 125.0); detail: 2.5 / 3.5; all: 3.167 / 3.5 (19/6, 21/6)
    assert "\nall 90.5 35.0 31.7\ncomplex 90.0 100.0 90.0\nconv 125.1 13.3 16.7\ndetail 71.4 35.0 25.0\n" in (
        capsys.readouterr().out)
    s = summarize(recs)
    assert s["categories"]["conv"]["relative_score"] == pytest.approx(125.0)
    assert s["categories"]["detail"]["relative_score"] == pytest.approx(75.0)
    assert s["categories"]["detail"]["parse_errors"] == 1
    assert s["overall"]["relative_score"] == pytest.approx((1 + 1 + 3 + 6 + 9) / (1 + 1 + 2 + 8 + 10) * 100)
    recs = [{"question_id": 1, "category": "llava_bench_conv", "tuple": [8, 6]},
            {"question_id": 2, "category": "llava_bench_conv", "tuple": [-1, -1]},
            {"question_id": 3, "category": "llava_bench_detail", "tuple": [4, 4]},
            {"question_id": 4, "category": "llava_bench_complex", "tuple": [10, 9]}]
    s = summarize(recs)
    assert s["categories"]["conv"]["relative_score"] == pytest.approx(75.0)
    assert s["categories"]["conv"]["parse_errors"] == 1
    assert s["overall"]["relative_score"] == pytest.approx((6 + 4 + 9) / (8 + 4 + 10) * 100)
    only = summarize(recs, ["detail", "complex"])
    assert list(only["categories"]) == ["detail", "complex"]
    assert only["overall"]["relative_score"] == pytest.approx(13 / 14 * 100)
