"""Generated images kept in Redis for a while, served by URL (the HTTP API's
`response_format: url`).

Keys: `<prefix>image:<id>:<index>` holds one PNG and expires after `ttl_s`. The id is 128 random
bits: whoever has the URL may download the image (as with OpenAI's image URLs), nobody can
guess one.
"""

from __future__ import annotations

import re
import uuid

from sdserve.jobs import connection

IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")


class ImageStore:
    """`put` PNGs, get them back by (id, index) until they expire. Raises Unavailable when
    Redis cannot be reached."""

    def __init__(self, redis, url: str, prefix: str = "sdserve:", ttl_s: int = 3600):
        self.redis, self.url, self.prefix, self.ttl_s = redis, url, prefix, ttl_s

    def _key(self, image_id: str, index: int) -> str:
        return f"{self.prefix}image:{image_id}:{index}"

    async def put(self, pngs: list[bytes] | tuple[bytes, ...]) -> str:
        """Stores the images; returns their id (image i is at index i)."""
        image_id = uuid.uuid4().hex
        pipe = self.redis.pipeline(transaction=False)
        for index, png in enumerate(pngs):
            pipe.set(self._key(image_id, index), png, ex=self.ttl_s)
        await connection.call(self.url, pipe.execute())
        return image_id

    async def get(self, image_id: str, index: int) -> bytes | None:
        """The PNG, or None when there is none (a wrong id, or it expired)."""
        if not IMAGE_ID.match(image_id) or index < 0:
            return None
        return await connection.call(self.url, self.redis.get(self._key(image_id, index)))
