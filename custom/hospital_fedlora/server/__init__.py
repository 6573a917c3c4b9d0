"""What runs at the server for every job: the aggregators' shared checks, the plaintext aggregator and
persistor, the model locator and the round log."""
