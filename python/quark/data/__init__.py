"""Step 2 of the life cycle, the data pipeline, one module per step, each reading and writing files in
a run directory and resuming after an interruption:

    crawl (web pages) -> scrape (code files) -> clean -> dedup -> tokenizer -> pack -> loader

Run-dir layout (the contract between steps): crawl/pages-*.jsonl, scrape/files-*.jsonl,
clean/docs.jsonl, dedup/docs.jsonl, tokenizer/tokenizer.json, pack/{train.bin,val.bin,meta.json};
every step also writes <step>/stats.json.
"""
