"""Work over many runs or whole experiments, built on the recorder and the analyzer.

Precursor studies (:mod:`.study`), sweeps compared by an attribute (:mod:`.compare`), analysing many runs in
parallel (:mod:`.batch`), the grokking demo (:mod:`.demo`, needs torch) and the claims experiments
(:mod:`.claims`).  Importing this package imports none of them."""
