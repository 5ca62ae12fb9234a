"""ctriage: a CT-side appliance that flags COVID-19 pneumonia on chest CT while the patient is on the table."""

__version__ = "0.1.0"
