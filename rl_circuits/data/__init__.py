"""Questions and answers: benchmark datasets, generation, grading, the selection of Eqs. 10-12."""
