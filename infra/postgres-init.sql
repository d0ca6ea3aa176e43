-- Prefect's database (MLflow's, 'mlflow', is created by POSTGRES_DB).
CREATE DATABASE prefect;
