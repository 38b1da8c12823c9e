"""airflow_dags."""
