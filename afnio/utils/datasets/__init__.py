"""Ready-made datasets, downloaded on first use and verified by MD5.

* :class:`FacilitySupport`: Meta's Facility Support Analyzer emails (urgency,
  sentiment and service categories), items are Variables;
* :class:`TREC`: TREC question classification (coarse and fine labels), items are
  plain strings.

Files are stored under ``root`` (default ``$AFNIO_DATA_DIR``, else
``~/.cache/afnio/data``) in ``{root}/{DatasetName}/raw/``; a file already there with
the published MD5 is never downloaded again.

Example::

    >>> from afnio.utils.data import DataLoader
    >>> from afnio.utils.datasets import FacilitySupport
    >>> loader = DataLoader(FacilitySupport("train"), batch_size=8)  # doctest: +SKIP
"""

from afnio.utils.datasets.facility_support import FacilitySupport
from afnio.utils.datasets.trec import TREC

__all__ = ["FacilitySupport", "TREC"]
