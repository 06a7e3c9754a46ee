"""Visual-token bookkeeping: packing kept tokens back into padded batches (the splice)."""
