"""clipshot's HTTP client for line PCs: ``Client(url, key).predict("bottle", ["part.png"])``; httpx + pydantic only.

The models (``clipshot_client.models``) are generated from the service's OpenAPI schema, so they are the
service's answers field for field.
"""

from clipshot_client.client import DEFAULT_URL, Client, ClipshotError, ImageInput, retry_after_s
from clipshot_client.models import (
    CategoryDetail,
    CategorySummary,
    ImagePrediction,
    Job,
    JobState,
    PredictResponse,
    ReadyResponse,
)

__all__ = ["DEFAULT_URL", "CategoryDetail", "CategorySummary", "Client", "ClipshotError", "ImageInput",
           "ImagePrediction", "Job", "JobState", "PredictResponse", "ReadyResponse", "retry_after_s"]
