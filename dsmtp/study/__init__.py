"""`dsmtp study`: what MTP buys, measured at equal tokens (runner, evaluate, humaneval, report)."""
