"""Checks of a running `moe serve` with real clients (the official openai client, prometheus_client's parser,
raw sockets), called by the serving integration scripts: python serve_checks.py CHECK PORT [ARGS...].
Each check prints one line and exits non-zero (with the reason) on failure."""
import http.client
import json
import os
import socket
import sys
import threading
import time

import openai
from prometheus_client.parser import text_string_to_metric_families

KEY = "test-key-0123456789"


def client(port):
    return openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key=KEY, max_retries=0, timeout=120)


def model_id(c):
    models = c.models.list().data
    assert len(models) == 1, models
    return models[0].id


def greedy(port, prompt, expect_file, max_tokens):
    """Non-streaming and streaming completions (greedy) give `moe generate`'s continuation, token for token:
    the prompt followed by the completion's text is what generate printed."""
    c = client(port)
    m = model_id(c)
    want = open(expect_file).read().rstrip("\n")
    r = c.completions.create(model=m, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=2)
    text = r.choices[0].text
    assert prompt + text == want, "completion %r, generate %r" % (prompt + text, want)
    assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length", r
    assert len(r.choices[0].logprobs.tokens) == max_tokens, r.choices[0].logprobs
    assert all(lp <= 0 for lp in r.choices[0].logprobs.token_logprobs)
    parts, last = [], None
    for chunk in c.completions.create(model=m, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                      stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            last = chunk.choices[0].finish_reason or last
        elif chunk.usage:
            assert chunk.usage.completion_tokens == max_tokens, chunk.usage
    assert "".join(parts) == text and last == "length", (parts, last)
    print("greedy: completions and stream equal moe generate (%d tokens): %r" % (max_tokens, text[:60]))


def chat(port):
    """Chat completions, plain and streamed, through the documented template; sampling with a seed repeats."""
    c = client(port)
    m = model_id(c)
    msgs = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak, ROMEO."}]
    r = c.chat.completions.create(model=m, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=3)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str), r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content), content
    streamed, roles = [], []
    for chunk in c.chat.completions.create(model=m, messages=msgs, max_tokens=12, temperature=0, stream=True):
        d = chunk.choices[0].delta
        if d.role:
            roles.append(d.role)
        if d.content:
            streamed.append(d.content)
    assert roles == ["assistant"] and "".join(streamed) == msg.content, (roles, streamed, msg.content)
    a = c.chat.completions.create(model=m, messages=msgs, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    b = c.chat.completions.create(model=m, messages=msgs, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content, (a, b)
    print("chat: %r (stream equal; seeded sampling repeats)" % msg.content[:60])


def concurrent(port, n, max_tokens):
    """Batch invariance through the server: each of n greedy requests sent at once gets the tokens it gets alone."""
    c = client(port)
    m = model_id(c)
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING RICHARD", "O", "What light through",
               "MENENIUS:\nEither you must", "I say", "JULIET:\nAy me", "He that", "Tell me, good", "Now is the",
               "Speak", "Good morrow", "What, ho!", "The king's a", "Alas"][:n]
    alone = [c.completions.create(model=m, prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
             for p in prompts]
    together = [None] * n

    def one(i):
        together[i] = client(port).completions.create(model=m, prompt=prompts[i], max_tokens=max_tokens,
                                                      temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, a, t in zip(prompts, alone, together):
        assert a == t, "prompt %r: alone %r, among %d: %r" % (p, a, n, t)
    print("concurrent: %d requests at once give their solo tokens" % n)


def metrics(port):
    """/metrics parses with prometheus_client; the serving families are there and count what happened."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + KEY})
    r = conn.getresponse()
    body = r.read().decode()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain"), (r.status, body[:200])
    fam = {f.name: f for f in text_string_to_metric_families(body)}
    need = ["moe_http_requests", "moe_prompt_tokens", "moe_generation_tokens", "moe_time_to_first_token_seconds",
            "moe_inter_token_latency_seconds", "moe_requests_waiting", "moe_requests_running", "moe_kv_blocks_used",
            "moe_kv_blocks_free", "moe_preemptions", "moe_expert_tokens"]
    missing = [n for n in need if n not in fam]
    assert not missing, "missing metric families %s (have %s)" % (missing, sorted(fam))
    value = {s.name: s.value for f in fam.values() for s in f.samples if not s.labels}
    assert value["moe_generation_tokens_total"] > 0 and value["moe_prompt_tokens_total"] > 0, value
    assert value["moe_kv_blocks_used"] == 0 and value["moe_requests_running"] == 0, value
    ttft = [s for s in fam["moe_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and ttft[0].value > 0, ttft
    experts = [s for s in fam["moe_expert_tokens"].samples]
    assert experts and sum(s.value for s in experts) > 0, experts
    print("metrics: %d families; %d tokens generated; expert loads %s" % (
        len(fam), value["moe_generation_tokens_total"], [int(s.value) for s in experts][:8]))


def disconnect(port):
    """A client that goes away mid-stream cancels its request: its KV blocks are freed, the server goes on."""
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": 40, "stream": True, "temperature": 0})
    s.sendall(("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
               "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (KEY, len(body), body)).encode())
    got = b""
    while got.count(b"data: ") < 2:
        got += s.recv(4096)
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics", headers={"Authorization": "Bearer " + KEY})
        text = conn.getresponse().read().decode()
        v = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
        if v["moe_kv_blocks_used"] == 0 and v["moe_requests_running"] == 0:
            print("disconnect: the abandoned stream was cancelled and its KV blocks freed")
            return
        time.sleep(0.1)
    raise AssertionError("the abandoned request still holds KV blocks: %s" % v)


def failover(port, started_file, stop_file):
    """Load through the coordinator's endpoint while a replica is killed: two clients send completions, one streams
    chat completions, until stop_file exists. Every completion must succeed (one whose replica dies is retried on
    another: its response comes whole, at the end); a stream may be cut short by the failure only after its first
    token (an error event then ends it), never before. Writes started_file once requests have succeeded."""
    stats = {"ok": 0, "stream_ok": 0, "stream_cut": 0}
    errors = []
    lock = threading.Lock()
    m = model_id(client(port))

    def completions():
        c = client(port)
        while not os.path.exists(stop_file):
            try:
                r = c.completions.create(model=m, prompt="ROMEO:", max_tokens=24, temperature=0)
                assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length", r
                with lock:
                    stats["ok"] += 1
                    if stats["ok"] == 4:
                        open(started_file, "w").close()
            except Exception as e:  # noqa: BLE001 (any failure is the finding)
                with lock:
                    errors.append("completion at %.3f: %r" % (time.time(), e))

    def streams():
        c = client(port)
        while not os.path.exists(stop_file):
            tokens = 0
            try:
                for chunk in c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Speak."}],
                                                       max_tokens=24, temperature=0, stream=True):
                    if chunk.choices and chunk.choices[0].delta.content:
                        tokens += 1
                with lock:
                    stats["stream_ok"] += 1
            except openai.APIError as e:
                with lock:
                    if tokens > 0:
                        stats["stream_cut"] += 1  # the replica died after the first token: cut, with an error
                    else:
                        errors.append("stream before its first token at %.3f: %r" % (time.time(), e))

    threads = [threading.Thread(target=f) for f in (completions, completions, streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "%d failed: %s" % (len(errors), errors[:5])
    assert stats["ok"] > 0 and stats["stream_ok"] > 0, stats
    print("failover: %d completions, %d streams whole, %d streams cut after their first token; no failure" % (
        stats["ok"], stats["stream_ok"], stats["stream_cut"]))


def sparq(port):
    """SparQ attention through the openai client (extension fields in extra_body): full coverage (sparq_r = the
    head dim from /openapi.json, sparq_k = the context) gives full attention's greedy text; a small setting runs
    and repeats; one field without the other is a 400 naming the missing one."""
    c = client(port)
    m = model_id(c)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/openapi.json", headers={"Authorization": "Bearer " + KEY})
    props = json.loads(conn.getresponse().read())["components"]["schemas"]["CompletionRequest"]["properties"]
    head_dim, ctx = props["sparq_r"]["maximum"], props["sparq_k"]["maximum"]
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."

    def text(**extra):
        return c.completions.create(model=m, prompt=prompt, max_tokens=24, temperature=0,
                                    extra_body=extra).choices[0].text

    full = text()
    assert text(sparq_r=head_dim, sparq_k=ctx) == full, "full-coverage SparQ changed the greedy text"
    small = text(sparq_r=2, sparq_k=4)
    assert small == text(sparq_r=2, sparq_k=4), "SparQ greedy text does not repeat"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "sparq_r": 2}),
                 headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    assert r.status == 400 and err["param"] == "sparq_k", (r.status, err)
    print("sparq: full coverage (r=%d, k=%d) equals full attention; r=2 k=4 gives %r; a lone sparq_r is a 400" % (
        head_dim, ctx, small[:40]))


def main():
    check, port = sys.argv[1], int(sys.argv[2])
    {"greedy": lambda: greedy(port, sys.argv[3], sys.argv[4], int(sys.argv[5])),
     "chat": lambda: chat(port),
     "concurrent": lambda: concurrent(port, int(sys.argv[3]), int(sys.argv[4])),
     "metrics": lambda: metrics(port),
     "disconnect": lambda: disconnect(port),
     "sparq": lambda: sparq(port),
     "failover": lambda: failover(port, sys.argv[3], sys.argv[4])}[check]()


if __name__ == "__main__":
    main()
