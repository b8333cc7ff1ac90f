"""The long-lived engine core: one scheduler, block manager and model runner per stage, shared by all requests."""
