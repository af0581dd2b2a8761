"""`tsqp bench`: prefill latency, decode speed and where each decoded token's time goes."""
