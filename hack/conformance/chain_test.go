package conformance

import (
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
)

func identityChainID(diffIDs []digest.Digest) string {
	return identity.ChainID(diffIDs).String()
}
