"""The streaming engine: select the inputs, plan the run, reduce tensor by tensor, write.

Nothing here imports torch unless a torch format is read or written, and nothing here
imports `nn`, `selection` or `cli`."""
