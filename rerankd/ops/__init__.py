"""Leaf kernels our models run on (torch and rerankd.types only, never engine/ or models/):
batch packing, attention dispatch, the AMX kernel, oneDNN ops, prepacked and int8 linears,
CPU flags."""
