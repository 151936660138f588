"""The hub database (SQLAlchemy 2): tokens (stored as sha256 hashes), models (one row per stub,
holding the card), files (path, size, sha256 per model). SQLite file by default, PostgreSQL (or any
SQLAlchemy URL) by URL."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from obert_modifiers.errors import ObertError


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    stub: Mapped[str] = mapped_column(String(500), unique=True, index=True)
    domain: Mapped[str] = mapped_column(String(100), index=True)
    sub_domain: Mapped[str] = mapped_column(String(100), index=True)
    architecture: Mapped[str] = mapped_column(String(100), index=True)
    sub_architecture: Mapped[str | None] = mapped_column(String(100), nullable=True)
    framework: Mapped[str] = mapped_column(String(100))
    repo: Mapped[str] = mapped_column(String(100))
    dataset: Mapped[str] = mapped_column(String(100), index=True)
    training_scheme: Mapped[str | None] = mapped_column(String(100), nullable=True)
    sparse_tag: Mapped[str] = mapped_column(String(100), index=True)
    task: Mapped[str] = mapped_column(String(100))
    owner: Mapped[str] = mapped_column(String(200))
    card_json: Mapped[str] = mapped_column(Text)
    card_body: Mapped[str] = mapped_column(Text)
    search_text: Mapped[str] = mapped_column(Text)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    files: Mapped[list[File]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="File.path", lazy="selectin"
    )


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("model_id", "path"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[Model] = relationship(back_populates="files")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class TokenNameError(ObertError, ValueError):
    """A token (owner) name that cannot be used."""


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def create_token(self, name: str) -> str:
        """A new write token for ``name`` (returned once, stored hashed)."""
        name = name.strip()
        if not name or len(name) > 200:
            raise TokenNameError(f"token name {name[:40]!r}: must be 1-200 characters")
        if any(not c.isprintable() for c in name):
            raise TokenNameError(f"token name {name[:80]!r} refused: it holds a control character")
        token = "obh_" + secrets.token_urlsafe(32)
        with self.session.begin() as session:
            existing = session.scalar(select(Token).where(Token.name == name))
            if existing is not None:
                existing.token_hash = hash_token(token)
                existing.revoked = False
            else:
                session.add(Token(name=name, token_hash=hash_token(token)))
        return token

    def revoke_token(self, name: str) -> bool:
        with self.session.begin() as session:
            existing = session.scalar(select(Token).where(Token.name == name))
            if existing is None:
                return False
            existing.revoked = True
            return True

    def token_owner(self, token: str) -> str | None:
        with self.session() as session:
            row = session.scalar(select(Token).where(Token.token_hash == hash_token(token)))
            if row is None or row.revoked:
                return None
            return row.name


def hash_token(token: str) -> str:
    # tokens are 256-bit random strings, so a plain sha256 cannot be brute-forced
    return hashlib.sha256(token.encode()).hexdigest()


def session_scope(db: Database) -> Session:
    return db.session()
