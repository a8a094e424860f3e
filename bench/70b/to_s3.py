#!/usr/bin/env python3
"""Uploads sparse checkpoints from bench/gen_sparse_70b.py to an S3 bucket without sending their
zeros: each shard is a multipart upload whose first part holds the file's first bytes (the
safetensors header and zeros up to 8 MiB) and whose other parts are server-side copies
(UploadPartCopy) of ranges of one zero object. The script checks, with SEEK_DATA, that the
file holds no data past its first part (what the generator writes), so the object's bytes are
exactly the file's. Small files (config, index) are put whole. Needs boto3.

    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_REGION=... \\
        bench/70b/to_s3.py BUCKET PREFIX MODEL_DIR...       # each MODEL_DIR -> PREFIX/NAME/

The server still reads and writes every copied byte (Garage 2.5 copies block by block: about
2.8 CPU-s per GiB here), but it stores one block of zeros (content-addressed) and nothing
crosses the network. A shard identical to one already uploaded (same size, same first part,
zeros after it: the generator writes the same shards for every model) is made with one
CopyObject of that object instead, which Garage does from its block list without reading
the data (the object may exceed AWS's 5 GB single-copy limit; Garage does not enforce it).
"""

import hashlib

import errno
import os
import sys

import boto3

HEAD = 8 << 20  # the first part: the header and zeros up to here
COPY = 1 << 30  # each copied part, and the zero object's size
ZERO = "_zeros_1GiB"


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )


def multipart(s3, bucket, key, parts):
    """parts: (kind, arg) with kind 'body' (bytes) or 'copy' ((source key, first, last))."""
    up = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    done = []
    try:
        for i, (kind, arg) in enumerate(parts, 1):
            if kind == "body":
                r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up, PartNumber=i, Body=arg)
                etag = r["ETag"]
            else:
                src, a, b = arg
                r = s3.upload_part_copy(Bucket=bucket, Key=key, UploadId=up, PartNumber=i,
                                        CopySource={"Bucket": bucket, "Key": src},
                                        CopySourceRange=f"bytes={a}-{b}")
                etag = r["CopyPartResult"]["ETag"]
            done.append({"PartNumber": i, "ETag": etag})
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up,
                                     MultipartUpload={"Parts": done})
    except BaseException:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=up)
        raise


def zero_object(s3, bucket):
    """A COPY-byte object of zeros: 64 MiB put once, copied 16 times."""
    small = 64 << 20
    s3.put_object(Bucket=bucket, Key=ZERO + ".64M", Body=bytes(small))
    multipart(s3, bucket, ZERO, [("copy", (ZERO + ".64M", 0, small - 1))] * (COPY // small))
    s3.delete_object(Bucket=bucket, Key=ZERO + ".64M")


def holes_after(path, at):
    """Whether the file holds no data at or past byte `at`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, at, os.SEEK_DATA)
        return False
    except OSError as e:
        if e.errno == errno.ENXIO:
            return True
        raise
    finally:
        os.close(fd)


def upload_shard(s3, bucket, key, path, seen):
    """seen: (size, digest of the first part) -> key of an uploaded identical object."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(min(size, HEAD))
    if size <= HEAD:
        s3.put_object(Bucket=bucket, Key=key, Body=head)
        return
    if not holes_after(path, HEAD):
        sys.exit(f"{path}: holds data past its first {HEAD} bytes; not a sparse checkpoint")
    same = (size, hashlib.sha256(head).hexdigest())
    if same in seen:
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": seen[same]})
        return
    seen[same] = key
    parts = [("body", head)]
    at = HEAD
    while at < size:
        n = min(COPY, size - at)
        parts.append(("copy", (ZERO, 0, n - 1)))
        at += n
    multipart(s3, bucket, key, parts)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    bucket, prefix, dirs = sys.argv[1], sys.argv[2].strip("/"), sys.argv[3:]
    s3 = client()
    zero_object(s3, bucket)
    seen = {}
    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        for f in sorted(os.listdir(d)):
            path, key = os.path.join(d, f), f"{prefix}/{name}/{f}" if prefix else f"{name}/{f}"
            if f.endswith(".safetensors"):
                upload_shard(s3, bucket, key, path, seen)
            else:
                with open(path, "rb") as fh:
                    s3.put_object(Bucket=bucket, Key=key, Body=fh.read())
            print(f"s3://{bucket}/{key}", flush=True)
    s3.delete_object(Bucket=bucket, Key=ZERO)


if __name__ == "__main__":
    main()
