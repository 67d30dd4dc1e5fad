"""Planning a run before it costs GPU hours: the throughput and memory model (`pretrain plan`),
the rehearsal and the fake-tensor step it is checked against, the accelerator table and
`pretrain doctor`."""
