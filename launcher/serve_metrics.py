"""The model replicas' engine metrics, in Ray's metrics pipeline: each node's metrics agent serves them
to Prometheus (at its metrics export port, with Ray's own and Serve's), so a cluster's existing
Prometheus and Grafana see them with no endpoint of ours. They are what vLLM's /metrics reports, under
`lm_` names (Prometheus shows them as `ray_lm_...`): requests running and waiting, prompt and generated
tokens, prefix-cache lookups and hits (in tokens), finished requests by finish reason, and time to
first token, time per output token and end-to-end latency as histograms. Serve tags each series with
its application, deployment and replica; `model_name` is the name the API serves the model under.

Times are the replica's: from a request's arrival at the model replica, so they leave out the HTTP
proxy and the ingress (Serve's own `ray_serve_*` latency metrics cover those). Ray 2.60 exports a
histogram's `_sum` from its buckets' midpoints, not the observed values: read latencies from the
buckets (`histogram_quantile`), as cluster/grafana/lmstack_serving.json does.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

# seconds; Prometheus' histogram_quantile interpolates within a bucket
LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                         0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


class EngineMetrics:
    """One replica's metrics; its methods are called from the replica's event loop."""

    def __init__(self, model_name: str, prefix_caching: bool):
        tags = ("model_name",)

        def made(metric):
            metric.set_default_tags({"model_name": model_name})
            return metric

        self.running = made(Gauge("lm_num_requests_running", "Requests in a batch slot (prefilling or decoding)", tags))
        self.waiting = made(Gauge("lm_num_requests_waiting", "Requests waiting for a batch slot", tags))
        self.prompt_tokens = made(Counter("lm_prompt_tokens_total", "Prompt tokens prefilled", tags))
        self.generation_tokens = made(Counter("lm_generation_tokens_total", "Tokens generated", tags))
        self.prefix_caching = prefix_caching
        self.cache_queries = made(Counter("lm_prefix_cache_queries_total",
                                          "Prompt tokens looked up in the prefix cache", tags))
        self.cache_hits = made(Counter("lm_prefix_cache_hits_total", "Prompt tokens found in the prefix cache", tags))
        self.finished = made(Counter("lm_requests_total", "Finished requests by finish reason (stop, length; abort: "
                                     "the client went away; error: a decode step failed)", tags + ("finished_reason",)))
        self.first_token = made(Histogram("lm_time_to_first_token_seconds", "Seconds from a request's arrival at "
                                          "the replica to its first token", LATENCY_BUCKETS, tags))
        self.per_token = made(Histogram("lm_time_per_output_token_seconds", "A request's mean seconds between "
                                        "tokens after its first", TOKEN_LATENCY_BUCKETS, tags))
        self.latency = made(Histogram("lm_e2e_request_latency_seconds", "Seconds from a request's arrival at the "
                                      "replica to its last token", LATENCY_BUCKETS, tags))

    def load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def request_finished(self, seq, arrived: float, first_token: float | None, now: float,
                         reason: str | None = None) -> None:
        """A request's counts and times, once it has ended for any reason (`seq`: its lm.engine Sequence;
        times from time.monotonic(); `first_token` None if it ended before its first token; `reason`:
        "error" for a failed decode step, else the sequence's own finish reason)."""
        generated = len(seq.output_ids)
        if generated:
            self.generation_tokens.inc(generated)
        self.finished.inc(tags={"finished_reason": reason or seq.finish_reason or "abort"})
        if seq.finish_reason in ("stop", "length"):
            self.latency.observe(now - arrived)
        if first_token is None:  # never prefilled: an abort while it waited
            return
        self.first_token.observe(first_token - arrived)
        if generated > 1:
            self.per_token.observe((now - first_token) / (generated - 1))
        self.prompt_tokens.inc(len(seq.prompt_ids))
        if self.prefix_caching:
            self.cache_queries.inc(len(seq.prompt_ids))
            if seq.cached_tokens:
                self.cache_hits.inc(seq.cached_tokens)
