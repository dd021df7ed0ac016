"""`tcae-ldm bench`: main (arguments, the run, the report), cases (what is timed), timing (how), tables (the
printout)."""
