"""What a model holds and computes: activation statistics over data, weight statistics, and
which nodes a QDQ model quantizes."""
