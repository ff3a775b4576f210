"""berth's benchmark: berth against raw Docker and naive builds (``bash bench/run.sh``)."""
