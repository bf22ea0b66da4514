"""Synthetic data sets for the experiments, each a numpy generator plus a Grain ``RandomAccessDataSource``.

- :mod:`experiments.data.mqar`: Zoology's multi-query associative recall (MQAR).
"""
