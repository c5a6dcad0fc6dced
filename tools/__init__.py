"""Client tooling run from a workstation (``shardserve bench``, the load generator): not a
plugin and not packaged for Lambda, so nothing here is on the serving path."""
