"""The analysis side: records -> metrics -> paired statistics -> report. Imports no torch."""
