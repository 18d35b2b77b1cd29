"""Load tests and benchmarks, apart from the product: `loadtest`, `soak`, `bench_publish`,
`bench_priority`, `bench_analytics_lag`, and the Procfile runner they and the tests start processes with.

It sits on top: it may import every app; no app imports it.
"""
